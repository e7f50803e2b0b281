//! End-to-end tests of configuration files (`-c`), of `wgslirpy init` and `add-peer`, and of
//! several peers on one gateway, with real wireguard-go peers. Needs root (skips loudly
//! without it, fails under `CI=true`), like every rig test.

mod rig;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::thread;
use std::time::Duration;

use rig::*;

/// The gateway's in-tunnel addresses in configs made by `init`.
const INIT_GATEWAY_V4: &str = "10.0.2.1";
const INIT_GATEWAY_V6: &str = "fd00::1";

/// Runs the wgslirpy binary (outside the namespaces: init and add-peer only write files).
fn wgslirpy(args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(Rig::binary());
    cmd.args(args).env_remove("RUST_LOG");
    run_timeout(cmd, Duration::from_secs(10)).expect_success()
}

/// What a test needs from a peer config printed by `init` or `add-peer`.
struct PrintedPeer {
    /// The config with the wg-quick-only keys removed, for `wg setconf`.
    setconf: String,
    /// Its `Address` entries (`IP/PREFIX`).
    addresses: Vec<String>,
    /// The gateway's public key (its `[Peer] PublicKey`).
    gateway_public: String,
}

/// Splits the printed config (the lines before the QR code) as a user would before
/// `wg setconf`: `Address`, `DNS` and `MTU` are wg-quick's, not wg's.
fn printed_peer(stdout: &str) -> PrintedPeer {
    let config: Vec<&str> = stdout
        .lines()
        .take_while(|line| !line.starts_with(['\u{2580}', '\u{2584}', '\u{2588}']))
        .collect();
    let value = |line: &str, key: &str| -> Option<String> {
        let (k, v) = line.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().to_owned())
    };
    let addresses: Vec<String> = config
        .iter()
        .filter_map(|line| value(line, "Address"))
        .flat_map(|v| {
            v.split(',')
                .map(|a| a.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let gateway_public = config
        .iter()
        .filter_map(|line| value(line, "PublicKey"))
        .next()
        .unwrap_or_else(|| panic!("no PublicKey in the printed config:\n{stdout}"));
    let setconf = config
        .iter()
        .filter(|line| {
            !["Address", "DNS", "MTU"]
                .iter()
                .any(|k| value(line, k).is_some())
        })
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(
        addresses.len(),
        2,
        "one IPv4 and one IPv6 address:\n{stdout}"
    );
    PrintedPeer {
        setconf,
        addresses,
        gateway_public,
    }
}

/// Loads `peer` into the wireguard-go device `dev` in `ns` with `wg setconf`, gives the
/// device the peer's addresses instead of any it had, and routes everything through it.
fn load_into_wireguard_go(rig: &Rig, ns: &Netns, dev: &str, peer: &PrintedPeer) {
    let file = rig.dir.join(format!("{dev}-setconf.conf"));
    fs::write(&file, &peer.setconf).unwrap();
    ns.ok(&["wg", "setconf", dev, &file.to_string_lossy()]);
    ns.ip(&format!("addr flush dev {dev}"));
    for address in &peer.addresses {
        let nodad = if address.contains(':') { " nodad" } else { "" };
        ns.ip(&format!("addr add {address} dev {dev}{nodad}"));
    }
    ns.ip(&format!("link set {dev} mtu {TUNNEL_MTU} up"));
    ns.ip(&format!("route replace default dev {dev}"));
    ns.ip(&format!("-6 route replace default dev {dev}"));
}

/// Waits until wireguard-go's `dev` reports a handshake with `gateway_public`.
#[track_caller]
fn wait_handshake_with(rig: &Rig, dev: &str, gateway_public: &str) {
    let done = wait_until(Duration::from_secs(15), || {
        rig.latest_handshakes(dev)
            .iter()
            .any(|(key, time)| key == gateway_public && *time != 0)
            .then_some(())
    });
    assert!(
        done.is_some(),
        "no handshake on {dev} within 15 s\n{}",
        rig.wg_show(dev, "dump")
    );
}

/// Pings `addr` from `ns`; panics unless `count` replies came.
#[track_caller]
fn assert_ping_from(rig: &Rig, ns: &Netns, addr: &str, count: u32) {
    let r = rig.ping(ns, addr.parse().unwrap(), count);
    assert!(
        r.received >= count,
        "ping {addr} from {}: {} of {} answered\n{}",
        ns.name,
        r.received,
        r.transmitted,
        r.output
    );
}

/// Sends `payload` from `ns` to the internet echo server at `server` and checks that this
/// very payload comes back, from the server.
#[track_caller]
fn assert_udp_echo(rig: &Rig, ns: &Netns, server: IpAddr, payload: &[u8]) {
    let server = SocketAddr::new(server, UDP_ECHO_PORT);
    let reply = rig
        .udp_roundtrip(ns, server, payload, 5, Duration::from_secs(1))
        .unwrap_or_else(|out| panic!("no UDP echo from {server} to {}: {out}", ns.name));
    assert_eq!(reply.from, server);
    assert_eq!(
        reply.payload, payload,
        "{} got someone else's datagram",
        ns.name
    );
}

/// (a) The gateway's keys, its peer (with a preshared key and allowed IPs) and its port come
/// from a config file alone; only `-P` is on the command line.
#[test]
fn gateway_from_config_file_alone() {
    let Some(mut rig) = Rig::builder("gateway_from_config_file_alone")
        .udp_echo()
        .defer_gateway()
        .start()
    else {
        return;
    };
    let gw = rig.gateway_keys().clone();
    let peer_public = rig.peer_keys().public.clone();

    let mut genpsk = Command::new("wg");
    genpsk.arg("genpsk");
    let psk = run_timeout(genpsk, CMD_TIMEOUT).expect_success().stdout;
    let psk = psk.trim();
    let psk_file = rig.dir.join("psk");
    fs::write(&psk_file, format!("{psk}\n")).unwrap();
    let dev = rig.wg_dev.clone();
    rig.peer.ok(&[
        "wg",
        "set",
        &dev,
        "peer",
        &gw.public,
        "preshared-key",
        &psk_file.to_string_lossy(),
    ]);

    let config = format!(
        "# the gateway of test gateway_from_config_file_alone\n\
         [Interface]\n\
         PrivateKey = {private}\n\
         ListenPort = {GW_PORT}\n\
         \n\
         [Peer]\n\
         PublicKey = {peer_public}\n\
         PresharedKey = {psk}\n\
         Endpoint = {PEER_UNDERLAY_V4}:{PEER_PORT}\n\
         AllowedIPs = {PEER_INNER_V4}/32\n\
         AllowedIPs = {PEER_INNER_V6}/128\n",
        private = gw.private,
    );
    let path = rig.dir.join("gateway.conf");
    fs::write(&path, config).unwrap();
    rig.set_gateway_args(
        [
            "-c",
            &path.to_string_lossy(),
            "-P",
            &PINGABLE_V4.to_string(),
            "-P",
            &PINGABLE_V6.to_string(),
        ]
        .map(String::from)
        .into(),
    );
    rig.start_gateway();

    rig.wait_handshake(Duration::from_secs(15));
    rig.assert_ping(PINGABLE_V4.into(), 2);
    rig.assert_ping(PINGABLE_V6.into(), 2);
    let peer = rig.peer.clone();
    assert_udp_echo(&rig, &peer, INET_V4.into(), b"config file, v4");
    assert_udp_echo(&rig, &peer, INET_V6.into(), b"config file, v6");
}

/// (b) `init` writes the gateway's file and prints the peer's; the peer's goes into
/// wireguard-go through `wg setconf` once the wg-quick-only keys are gone.
#[test]
fn init_config_loads_into_wireguard_go() {
    let Some(mut rig) = Rig::builder("init_config_loads_into_wireguard_go")
        .defer_gateway()
        .start()
    else {
        return;
    };
    let path = rig.path("gateway.conf");
    let endpoint = format!("{GW_UNDERLAY_V4}:{GW_PORT}");
    let printed = wgslirpy(&["init", "--endpoint", &endpoint, "--config", &path]);
    let peer = printed_peer(&printed.stdout);
    assert_eq!(peer.addresses, ["10.0.2.2/32", "fd00::2/128"]);

    rig.set_gateway_args(vec!["-c".into(), path]);
    rig.start_gateway();
    let (ns, dev) = (rig.peer.clone(), rig.wg_dev.clone());
    load_into_wireguard_go(&rig, &ns, &dev, &peer);

    wait_handshake_with(&rig, &dev, &peer.gateway_public);
    assert_ping_from(&rig, &ns, INIT_GATEWAY_V4, 2);
    assert_ping_from(&rig, &ns, INIT_GATEWAY_V6, 2);
}

/// (c) Two wireguard-go peers in two namespaces, one from `init` and one from `add-peer`,
/// use the gateway at the same time; each gets its own echo replies.
#[test]
fn two_peers_from_init_and_add_peer_at_once() {
    let Some(mut rig) = Rig::builder("two_peers_from_init_and_add_peer_at_once")
        .udp_echo()
        .defer_gateway()
        .start()
    else {
        return;
    };
    let path = rig.path("gateway.conf");
    let endpoint = format!("{GW_UNDERLAY_V4}:{GW_PORT}");
    let first =
        printed_peer(&wgslirpy(&["init", "--endpoint", &endpoint, "--config", &path]).stdout);
    let second =
        printed_peer(&wgslirpy(&["add-peer", "--config", &path, "--name", "second"]).stdout);
    assert_eq!(second.addresses, ["10.0.2.3/32", "fd00::3/128"]);

    rig.set_gateway_args(vec!["-c".into(), path]);
    rig.start_gateway();

    let (ns_a, dev_a) = (rig.peer.clone(), rig.wg_dev.clone());
    load_into_wireguard_go(&rig, &ns_a, &dev_a, &first);
    let ns_b = rig.add_peer_netns();
    let dev_b = format!("{}b", rig.wg_dev);
    rig.start_wireguard_go(&ns_b, &dev_b);
    load_into_wireguard_go(&rig, &ns_b, &dev_b, &second);

    wait_handshake_with(&rig, &dev_a, &first.gateway_public);
    wait_handshake_with(&rig, &dev_b, &second.gateway_public);

    let rig = &rig;
    thread::scope(|s| {
        for (ns, name) in [(&ns_a, "peer A"), (&ns_b, "peer B")] {
            s.spawn(move || {
                assert_ping_from(rig, ns, INIT_GATEWAY_V4, 3);
                for round in 0..3 {
                    let v4 = format!("{name}, v4, round {round}");
                    assert_udp_echo(rig, ns, INET_V4.into(), v4.as_bytes());
                    let v6 = format!("{name}, v6, round {round}");
                    assert_udp_echo(rig, ns, INET_V6.into(), v6.as_bytes());
                }
            });
        }
    });
}
