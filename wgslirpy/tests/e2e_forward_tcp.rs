//! End-to-end tests of reverse TCP forwarding (`-t HOST,SOURCE,DEST`, issue 5): clients in
//! the "internet" namespace connect to the gateway's HOST port and reach servers inside the
//! tunnel, on the peer: a 1 MB echo and half-close in both orders, byte-exact; 100
//! connections at once; the source address the server sees, with and without SOURCE, and
//! round-robin source ports; IPv6; a DEST that refuses or does not answer. Need root (skip
//! loudly without it, fail under `CI=true`).

mod rig;

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports of the servers inside the tunnel.
const ECHO_PORT: u16 = 7001;
const WHOAMI_PORT: u16 = 7002;
const GREET_PORT: u16 = 7003;
/// A port nothing listens on inside the tunnel.
const CLOSED_PORT: u16 = 7999;

/// The TCP client and server tool of the TCP tests; its subcommands are listed in the file.
const TOOL_PY: &str = include_str!("rig/tcp_tool.py");

/// Starts a rig whose gateway has the `-t` forwards `forwards` (and `extra` arguments).
fn start(test: &str, forwards: &[String], extra: &[&str], log: &str) -> Option<Rig> {
    let mut args: Vec<&str> = forwards.iter().flat_map(|f| ["-t", f.as_str()]).collect();
    args.extend_from_slice(extra);
    let rig = Rig::builder(test)
        .gateway_args(&args)
        .rust_log(log)
        .start()?;
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    fs::write(rig.dir.join("tool.py"), TOOL_PY).unwrap();
    Some(rig)
}

/// Starts a tool server on the peer, inside the tunnel.
fn tunnel_server(rig: &mut Rig, args: &[&str], port: u16) -> ProcId {
    let script = rig.path("tool.py");
    let mut argv = vec!["python3", script.as_str()];
    argv.extend_from_slice(args);
    let peer = rig.peer.clone();
    let id = rig.spawn(&peer, args[0], &argv);
    rig.wait_listening(id, Proto::TcpListen, port);
    id
}

/// Runs a tool client in the internet ns and returns its output (panics if it fails).
#[track_caller]
fn client(rig: &Rig, args: &[&str], timeout: Duration) -> CmdOutput {
    let script = rig.path("tool.py");
    let mut argv = vec!["python3", script.as_str()];
    argv.extend_from_slice(args);
    let out = rig.inet.run_timeout(&argv, timeout);
    assert!(out.success(), "{out}");
    out
}

/// `ip:port` for a HOST or DEST address.
fn at(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// The gateway's shutdown statistics line (stops the gateway).
fn final_stats(rig: &mut Rig) -> String {
    rig.stop_gateway(libc::SIGTERM, Duration::from_secs(5));
    rig.gateway_log()
        .lines()
        .find(|l| l.contains("shutting down"))
        .unwrap_or("")
        .to_owned()
}

/// Runs `whoami` with `conns` connections to `host` and returns (local, seen) pairs.
fn whoami(rig: &Rig, host: IpAddr, port: u16, conns: usize) -> Vec<(SocketAddr, SocketAddr)> {
    let out = client(
        rig,
        &[
            "whoami",
            &host.to_string(),
            &port.to_string(),
            &conns.to_string(),
        ],
        Duration::from_secs(30),
    );
    let pairs: Vec<(SocketAddr, SocketAddr)> = out
        .stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let ["local", local, "seen", seen] = f[..] else {
                panic!("unexpected line {line:?}: {out}");
            };
            (local.parse().unwrap(), seen.parse().unwrap())
        })
        .collect();
    assert_eq!(pairs.len(), conns, "{out}");
    pairs
}

/// 1 MB through an echo server inside the tunnel, over IPv4 and IPv6 triplets: the client
/// half-closes first and gets every byte back, then the server's FIN.
#[test]
fn reverse_echo_1mb_byte_exact_v4_and_v6() {
    let forwards = [
        format!("{},,{}", at(GW_INET_V4, 6000), at(PEER_INNER_V4, ECHO_PORT)),
        format!("{},,{}", at(GW_INET_V6, 6000), at(PEER_INNER_V6, ECHO_PORT)),
    ];
    let Some(mut rig) = start("fwd_tcp_echo", &forwards, &[], "debug") else {
        return;
    };
    tunnel_server(&mut rig, &["echo-server", "7001"], ECHO_PORT);
    for ip in [GW_INET_V4.to_string(), GW_INET_V6.to_string()] {
        let out = client(
            &rig,
            &["echo", &ip, "6000", "1048576", "1", "20"],
            Duration::from_secs(30),
        );
        eprintln!("{ip}: {}", out.stdout.trim());
    }
    let stats = final_stats(&mut rig);
    assert!(stats.contains("tcp_forward_accepted: 2,"), "{stats}");
}

/// The server inside the tunnel sends a greeting and half-closes at once, while the client
/// is still sending 2 MB: the client gets the whole greeting and EOF, the server every byte.
#[test]
fn reverse_half_close_server_first_every_byte_arrives() {
    let forwards = [format!(
        "{},,{}",
        at(GW_INET_V4, 6000),
        at(PEER_INNER_V4, GREET_PORT)
    )];
    let Some(mut rig) = start("fwd_tcp_halfclose", &forwards, &[], "debug") else {
        return;
    };
    let server = tunnel_server(&mut rig, &["greet-server", "7003", "100000"], GREET_PORT);
    let ip = GW_INET_V4.to_string();
    let out = client(
        &rig,
        &["greet-client", &ip, "6000", "2097152"],
        Duration::from_secs(30),
    );
    let greeting = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("greeting "))
        .expect("client reports the greeting");
    assert!(greeting.starts_with("100000 "), "{out}");
    let sent = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sent "))
        .expect("client reports what it sent")
        .to_owned();
    let got = wait_until(Duration::from_secs(10), || {
        rig.proc(server)
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("got ").map(str::to_owned))
    });
    assert_eq!(
        got.as_deref(),
        Some(sent.as_str()),
        "server got other bytes"
    );
}

/// 100 reverse connections at once each echo 256 KB, all byte-exact, and all close.
#[test]
fn reverse_100_concurrent_echoes_all_complete() {
    let forwards = [format!(
        "{},,{}",
        at(GW_INET_V4, 6000),
        at(PEER_INNER_V4, ECHO_PORT)
    )];
    let Some(mut rig) = start("fwd_tcp_many", &forwards, &[], "info") else {
        return;
    };
    tunnel_server(&mut rig, &["echo-server", "7001"], ECHO_PORT);
    let script = rig.path("tool.py");
    let ip = GW_INET_V4.to_string();
    let argv = [&script, "echo", &ip, "6000", "262144", "100", "60"];
    let out = rig
        .inet
        .run_timeout(&[&["python3"], &argv[..]].concat(), Duration::from_secs(90));
    let stats = final_stats(&mut rig);
    assert!(out.success(), "{out}\n{stats}");
    eprintln!("100 x 256 KB: {}", out.stdout.trim());
    assert!(stats.contains("tcp_forward_accepted: 100,"), "{stats}");
    assert!(
        stats.contains("tcp_closed: 100,"),
        "not all closed: {stats}"
    );
    eprintln!("{stats}");
}

/// What the server inside the tunnel sees as the source: without SOURCE the client's own
/// address (v4 and v6); with SOURCE that address, its port for the first connection and
/// others, round-robin, for concurrent ones; with SOURCE port 0 round-robin ports, never two
/// alike, under concurrency.
#[test]
fn reverse_sources_with_and_without_source_and_round_robin_ports() {
    let source_v4 = SocketAddr::new(PINGABLE_V4.into(), 6100);
    let source_v6 = SocketAddr::new(PINGABLE_V6.into(), 0);
    let whoami_v4 = at(PEER_INNER_V4, WHOAMI_PORT);
    let whoami_v6 = at(PEER_INNER_V6, WHOAMI_PORT);
    let forwards = [
        format!("{},,{whoami_v4}", at(GW_INET_V4, 6000)),
        format!("{},,{whoami_v6}", at(GW_INET_V6, 6000)),
        format!("{},{source_v4},{whoami_v4}", at(GW_INET_V4, 6001)),
        format!("{},{source_v6},{whoami_v6}", at(GW_INET_V6, 6001)),
    ];
    let Some(mut rig) = start("fwd_tcp_sources", &forwards, &[], "info") else {
        return;
    };
    tunnel_server(&mut rig, &["whoami-server", "7002"], WHOAMI_PORT);

    // SOURCE left out: the client's own address, port included.
    for host in [IpAddr::from(GW_INET_V4), GW_INET_V6.into()] {
        let pairs = whoami(&rig, host, 6000, 5);
        for (local, seen) in &pairs {
            assert_eq!(local, seen, "{host}: {pairs:?}");
        }
    }

    // SOURCE given: its address; its port while free, then round-robin ports.
    let pairs = whoami(&rig, GW_INET_V4.into(), 6001, 10);
    let seen: Vec<SocketAddr> = pairs.iter().map(|p| p.1).collect();
    assert_eq!(seen[0], source_v4, "{seen:?}");
    assert!(seen.iter().all(|s| s.ip() == source_v4.ip()), "{seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 10, "{seen:?}");

    // SOURCE port 0, 30 connections at once: 30 distinct ephemeral ports.
    let pairs = whoami(&rig, GW_INET_V6.into(), 6001, 30);
    let seen: Vec<SocketAddr> = pairs.iter().map(|p| p.1).collect();
    assert!(seen.iter().all(|s| s.ip() == source_v6.ip()), "{seen:?}");
    assert!(seen.iter().all(|s| s.port() >= 49152), "{seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 30, "{seen:?}");
    eprintln!(
        "SOURCE port 0: {:?}",
        seen.iter().map(|s| s.port()).collect::<Vec<_>>()
    );
}

/// A DEST inside the tunnel that refuses (a closed port on the peer), over IPv4 and IPv6, and
/// one that does not answer (an address no one has, with `--tcp-connect-timeout 2`): the
/// host-side client's connection is reset, promptly.
#[test]
fn reverse_dest_refusing_or_silent_resets_the_client() {
    let silent = std::net::Ipv4Addr::new(
        PEER_INNER_V4.octets()[0],
        PEER_INNER_V4.octets()[1],
        PEER_INNER_V4.octets()[2],
        99,
    );
    let forwards = [
        format!(
            "{},,{}",
            at(GW_INET_V4, 6000),
            at(PEER_INNER_V4, CLOSED_PORT)
        ),
        format!(
            "{},,{}",
            at(GW_INET_V6, 6000),
            at(PEER_INNER_V6, CLOSED_PORT)
        ),
        format!("{},,{}", at(GW_INET_V4, 6001), at(silent, 80)),
    ];
    let Some(mut rig) = start(
        "fwd_tcp_refused",
        &forwards,
        &["--tcp-connect-timeout", "2"],
        "debug",
    ) else {
        return;
    };
    for (host, port, bound) in [
        (GW_INET_V4.to_string(), "6000", 5.0),
        (GW_INET_V6.to_string(), "6000", 5.0),
        (GW_INET_V4.to_string(), "6001", 10.0),
    ] {
        let out = client(&rig, &["wait-close", &host, port], Duration::from_secs(40));
        let fields: Vec<&str> = out.stdout.split_whitespace().collect();
        let [what, secs] = fields[..] else {
            panic!("{out}");
        };
        assert_eq!(what, "reset", "{host} {port}: {out}");
        let secs: f64 = secs.parse().unwrap();
        assert!(secs < bound, "{host} {port}: reset after {secs} s");
        eprintln!("{host}:{port}: reset after {secs} s");
    }
    let stats = final_stats(&mut rig);
    assert!(stats.contains("tcp_forward_refused: 2,"), "{stats}");
    assert!(stats.contains("tcp_forward_timeouts: 1,"), "{stats}");
}
