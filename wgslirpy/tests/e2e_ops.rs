//! End-to-end tests of running a gateway (issue 7's runtime part): `/metrics` and `/healthz`
//! (`--metrics`, scraped with curl inside the gateway's namespace), JSON logs
//! (`--log-format json`), SIGHUP reloading the peers of a config file while another peer keeps
//! its session, `wg set` adding and removing a peer through `--uapi-socket`, and SIGTERM
//! closing open TCP connections toward both sides and exiting 0 within 2 s. Needs root (skips
//! loudly without it, fails under `CI=true`), like every rig test.

mod rig;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use rig::*;

/// The in-tunnel address of a second peer.
const PEER2_INNER_V4: &str = "198.19.77.3";
/// The second peer's WireGuard port.
const PEER2_PORT: u16 = 51822;
/// The port of the SIGTERM test's TCP server.
const OPS_TCP_PORT: u16 = 9000;

/// `/metrics` counters grow with traffic, `/healthz` answers 200, and `--log-format json`
/// writes one JSON object per line.
#[test]
fn metrics_grow_with_traffic_and_logs_are_json() {
    let Some(mut rig) = Rig::builder("ops_metrics")
        .udp_echo()
        .gateway_args(&["--metrics", METRICS, "--log-format", "json"])
        .start()
    else {
        return;
    };
    rig.wait_handshake(Duration::from_secs(10));

    let (status, health) = rig.scrape("/healthz");
    assert!(status.starts_with("200 "), "{status} {health}");
    assert_eq!(health, "ok\n");
    let (status, before) = rig.scrape("/metrics");
    assert_eq!(status, "200 text/plain; version=0.0.4; charset=utf-8");
    let peer = format!("peer=\"{}\"", rig.peer_keys().public);
    let rx_bytes = format!("{peer},direction=\"rx\"");
    assert!(
        sample(
            &before,
            "wgslirpy_peer_last_handshake_timestamp_seconds",
            &peer
        ) > 0.0
    );

    rig.assert_ping(PINGABLE_V4.into(), 3);
    let server = std::net::SocketAddr::new(INET_V4.into(), UDP_ECHO_PORT);
    let peer_ns = rig.peer.clone();
    rig.udp_roundtrip(&peer_ns, server, b"counted", 3, Duration::from_secs(1))
        .unwrap_or_else(|out| panic!("no UDP echo: {out}"));

    let (_, after) = rig.scrape("/metrics");
    for (name, labels) in [
        ("wgslirpy_packets_total", "direction=\"rx\""),
        ("wgslirpy_packets_total", "direction=\"tx\""),
        ("wgslirpy_peer_bytes_total", rx_bytes.as_str()),
        ("wgslirpy_peer_packets_total", rx_bytes.as_str()),
        ("wgslirpy_flows_created_total", "protocol=\"udp\""),
        ("wgslirpy_icmp_echo_replies_total", "source=\"local\""),
    ] {
        let (was, is) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(is > was, "{name}{{{labels}}} did not grow: {was} -> {is}");
    }
    assert_eq!(
        sample(&after, "wgslirpy_flows_active", "protocol=\"udp\""),
        1.0
    );
    // The handshake was counted (within the counter's one-second poll).
    let handshakes = wait_until(Duration::from_secs(3), || {
        let (_, body) = rig.scrape("/metrics");
        let count = sample(&body, "wgslirpy_peer_handshakes_total", &peer);
        (count >= 1.0).then_some(count)
    });
    assert!(handshakes.is_some(), "no handshake counted");
    let (status, _) = rig.scrape("/nothing");
    assert!(status.starts_with("404 "), "{status}");

    let status = rig.stop_gateway(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let log = rig.gateway_log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":"),
            "not a JSON log line: {line}\n{log}"
        );
    }
    assert!(log.contains("\"message\":\"serving metrics at /metrics and /healthz\""));
}

/// The gateway's config file for `rig`, with the rig's own peer and, if given, a second one.
fn config_file(rig: &Rig, second: Option<&str>) -> String {
    let mut text = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {GW_PORT}\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = {PEER_INNER_V4}/32, {PEER_INNER_V6}/128\n",
        rig.gateway_keys().private,
        rig.peer_keys().public,
    );
    if let Some(key) = second {
        text.push_str(&format!(
            "\n[Peer]\nPublicKey = {key}\nAllowedIPs = {PEER2_INNER_V4}/32\n"
        ));
    }
    text
}

/// Starts a second wireguard-go peer in a namespace of its own, aimed at the gateway with a
/// 1 s keepalive (so it keeps trying to handshake), with [`PEER2_INNER_V4`] and a default
/// route through the tunnel. Returns its namespace, device and keys.
fn second_peer(rig: &mut Rig) -> (Netns, String, KeyPair) {
    let ns = rig.add_peer_netns();
    let dev = format!("{}b", rig.wg_dev);
    rig.start_wireguard_go(&ns, &dev);
    let keys = KeyPair::generate();
    let file = rig.dir.join(format!("{dev}.conf"));
    fs::write(
        &file,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {PEER2_PORT}\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {GW_UNDERLAY_V4}:{GW_PORT}\n\
             AllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 1\n",
            keys.private,
            rig.gateway_keys().public
        ),
    )
    .unwrap();
    ns.ok(&["wg", "setconf", &dev, &file.to_string_lossy()]);
    ns.ip(&format!("addr add {PEER2_INNER_V4}/32 dev {dev}"));
    ns.ip(&format!("link set {dev} mtu {TUNNEL_MTU} up"));
    ns.ip(&format!("route add default dev {dev}"));
    (ns, dev, keys)
}

/// `wg show DEV latest-handshakes` in `ns`, for its only peer (0 = never).
fn latest_handshake_in(ns: &Netns, dev: &str) -> u64 {
    let out = ns.ok(&["wg", "show", dev, "latest-handshakes"]);
    out.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// Pings `addr` once per try from `ns` until one answers, for up to `timeout`.
fn ping_within(rig: &Rig, ns: &Netns, addr: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        (rig.ping(ns, addr.parse().unwrap(), 1).received > 0).then_some(())
    })
    .is_some()
}

/// SIGHUP adds a peer from the edited config file while the first keeps its session (same
/// latest handshake, traffic throughout); a broken file is one error line naming file:line,
/// and the peers stay.
#[test]
fn sighup_adds_a_peer_and_the_other_keeps_its_session() {
    let Some(mut rig) = Rig::builder("ops_sighup")
        .defer_gateway()
        .peer_keepalive(Some(1))
        .start()
    else {
        return;
    };
    let path = rig.dir.join("gateway.conf");
    fs::write(&path, config_file(&rig, None)).unwrap();
    rig.set_gateway_args(
        [
            "-c",
            &path.to_string_lossy(),
            "-P",
            &PINGABLE_V4.to_string(),
        ]
        .map(String::from)
        .into(),
    );
    rig.start_gateway();
    rig.wait_handshake(Duration::from_secs(15));
    rig.assert_ping(PINGABLE_V4.into(), 2);
    let first_handshake = rig.latest_handshake();

    // The second peer knocks, but the gateway does not know it yet.
    let (ns_b, dev_b, keys_b) = second_peer(&mut rig);
    assert!(!ping_within(
        &rig,
        &ns_b,
        &PINGABLE_V4.to_string(),
        Duration::from_secs(2)
    ));

    // A broken file: one error line, nothing changes.
    fs::write(
        &path,
        format!(
            "{}\n[Peer]\nPublicKey = nonsense\n",
            config_file(&rig, None)
        ),
    )
    .unwrap();
    assert!(rig.gateway().signal(libc::SIGHUP));
    let broken = wait_until(Duration::from_secs(5), || {
        rig.gateway_log()
            .lines()
            .find(|l| l.contains("cannot reload"))
            .map(str::to_owned)
    });
    let line = broken.unwrap_or_else(|| panic!("no reload error\n{}", rig.gateway_log()));
    assert!(line.contains("gateway.conf:10: PublicKey"), "{line}");
    assert!(rig.gateway_alive());
    rig.assert_ping(PINGABLE_V4.into(), 1);

    // The fixed file, with the second peer: it joins, the first keeps its session.
    fs::write(&path, config_file(&rig, Some(&keys_b.public))).unwrap();
    assert!(rig.gateway().signal(libc::SIGHUP));
    let joined = ping_within(
        &rig,
        &ns_b,
        &PINGABLE_V4.to_string(),
        Duration::from_secs(15),
    );
    assert!(
        joined,
        "the added peer cannot ping\n{}\n{}",
        ns_b.run(&["wg", "show", &dev_b]),
        rig.gateway_log()
    );
    assert_ne!(latest_handshake_in(&ns_b, &dev_b), 0);
    assert!(
        rig.gateway_log()
            .contains("added=1 removed=0 updated=0 unchanged=1"),
        "{}",
        rig.gateway_log()
    );
    rig.assert_ping(PINGABLE_V4.into(), 3);
    assert_eq!(
        rig.latest_handshake(),
        first_handshake,
        "the first peer handshook again: its session was dropped"
    );

    // Removing the second peer from the file and reloading cuts it off.
    fs::write(&path, config_file(&rig, None)).unwrap();
    assert!(rig.gateway().signal(libc::SIGHUP));
    let gone = wait_until(Duration::from_secs(5), || {
        rig.gateway_log()
            .contains("added=0 removed=1 updated=0 unchanged=1")
            .then_some(())
    });
    assert!(gone.is_some(), "{}", rig.gateway_log());
    assert!(!ping_within(
        &rig,
        &ns_b,
        &PINGABLE_V4.to_string(),
        Duration::from_secs(2)
    ));
    rig.assert_ping(PINGABLE_V4.into(), 2);
    assert_eq!(rig.latest_handshake(), first_handshake);
}

/// `wg set NAME peer KEY allowed-ips …` through `--uapi-socket` adds a peer at run time, which
/// then passes traffic; `wg set NAME peer KEY remove` removes it.
#[test]
fn wg_set_adds_and_removes_a_peer_at_run_time() {
    let Some(mut rig) = Rig::builder("ops_wg_set").defer_gateway().start() else {
        return;
    };
    let name = format!("{}g", rig.wg_dev);
    let socket = format!("/var/run/wireguard/{name}.sock");
    let mut args = rig.gateway_args().to_vec();
    args.extend([
        "--uapi-socket".to_string(),
        socket,
        "--metrics".to_string(),
        METRICS.to_string(),
    ]);
    rig.set_gateway_args(args);
    rig.start_gateway();
    rig.wait_handshake(Duration::from_secs(10));

    let (ns_b, _dev_b, keys_b) = second_peer(&mut rig);
    let wg = |args: &[&str]| {
        let mut cmd = Command::new("wg");
        cmd.args(args);
        run_timeout(cmd, CMD_TIMEOUT).expect_success()
    };
    let allowed = format!("{PEER2_INNER_V4}/32");
    wg(&[
        "set",
        &name,
        "peer",
        &keys_b.public,
        "allowed-ips",
        &allowed,
    ]);
    let joined = ping_within(
        &rig,
        &ns_b,
        &PINGABLE_V4.to_string(),
        Duration::from_secs(15),
    );
    assert!(
        joined,
        "the peer added by wg set cannot ping\n{}",
        rig.gateway_log()
    );
    let shown = wg(&["show", &name, "peers"]).stdout;
    assert!(shown.contains(&keys_b.public), "{shown}");
    // The router follows the device: the new peer's packets are its own, not
    // the first peer's (whose allowed IPs cover everything).
    let (_, body) = rig.scrape("/metrics");
    let labels = format!("peer=\"{}\",direction=\"rx\"", keys_b.public);
    assert!(
        sample(&body, "wgslirpy_peer_packets_total", &labels) > 0.0,
        "{body}"
    );

    wg(&["set", &name, "peer", &keys_b.public, "remove"]);
    let shown = wg(&["show", &name, "peers"]).stdout;
    assert!(!shown.contains(&keys_b.public), "{shown}");
    assert!(!ping_within(
        &rig,
        &ns_b,
        &PINGABLE_V4.to_string(),
        Duration::from_secs(2)
    ));
    rig.assert_ping(PINGABLE_V4.into(), 2);
}

/// Both ends of the SIGTERM test: the server (in the internet namespace) streams to a
/// connection that starts with `D` and waits on one that starts with `I`; the client (in the
/// peer namespace) opens one of each, says `ready` once 1 MiB has come, and reports how each
/// connection ended (`end KIND reset|eof|hang|...`).
const TCP_ENDS: &str = r#"
import socket, sys, threading
printing = threading.Lock()
def report(kind, how):
    # One line at a time: the two connections end at about the same moment.
    with printing:
        sys.stdout.write("end %s %s\n" % (kind, how))
        sys.stdout.flush()
def reason(e):
    return "reset" if e.errno in (104, 32) else "error %s" % e.errno
def handle(c):
    kind = c.recv(1)
    try:
        if kind == b"D":
            chunk = b"x" * 65536
            while True:
                c.sendall(chunk)
        while True:
            if not c.recv(65536):
                report("idle", "eof")
                return
    except OSError as e:
        report("download" if kind == b"D" else "idle", reason(e))
def watch(c, kind):
    c.settimeout(20)
    try:
        while True:
            if not c.recv(65536):
                report(kind, "eof")
                return
    except socket.timeout:
        report(kind, "hang")
    except OSError as e:
        report(kind, reason(e))
if sys.argv[1] == "server":
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(sys.argv[2])))
    s.listen(8)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
else:
    d = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    d.sendall(b"D")
    i = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10)
    i.sendall(b"I")
    got = 0
    while got < 1 << 20:
        got += len(d.recv(65536))
    print("ready", flush=True)
    threads = [threading.Thread(target=watch, args=a) for a in ((d, "download"), (i, "idle"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
"#;

/// SIGTERM while a download and an idle connection are open: exit 0 within 2 s, and the
/// client and the server both see each connection end (a RST or EOF, not a hang).
#[test]
fn sigterm_ends_open_connections_both_ways_and_exits_within_2s() {
    let Some(mut rig) = Rig::builder("ops_sigterm").start() else {
        return;
    };
    rig.wait_handshake(Duration::from_secs(10));
    let port = OPS_TCP_PORT.to_string();
    let inet = rig.inet.clone();
    let server = rig.spawn(
        &inet,
        "ops-server",
        &[python(), "-c", TCP_ENDS, "server", &port],
    );
    rig.wait_listening(server, Proto::TcpListen, OPS_TCP_PORT);
    let peer = rig.peer.clone();
    let host = INET_V4.to_string();
    let client = rig.spawn(
        &peer,
        "ops-client",
        &[python(), "-c", TCP_ENDS, "client", &host, &port],
    );
    let ready = wait_until(Duration::from_secs(15), || {
        rig.proc(client).log().contains("ready").then_some(())
    });
    assert!(ready.is_some(), "no download\n{}", rig.proc(client).log());

    let start = Instant::now();
    let status = rig.stop_gateway(libc::SIGTERM, Duration::from_secs(5));
    let took = start.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        rig.gateway_log()
    );
    assert!(took < Duration::from_secs(2), "exit took {took:?}");

    for (id, who) in [(client, "client"), (server, "server")] {
        let ends = wait_until(Duration::from_secs(25), || {
            let log = rig.proc(id).log();
            (log.contains("end download") && log.contains("end idle")).then_some(log)
        });
        let log = ends
            .unwrap_or_else(|| panic!("the {who} did not see both ends\n{}", rig.proc(id).log()));
        for line in log.lines().filter(|l| l.starts_with("end ")) {
            assert!(
                line.ends_with(" reset") || line.ends_with(" eof"),
                "{who}: {line}\n{log}"
            );
        }
    }
}
