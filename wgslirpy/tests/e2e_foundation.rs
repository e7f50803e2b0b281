//! End-to-end tests of the `wgslirpy` binary: WireGuard and raw-IP tunnels, handshakes,
//! pings to `-P` addresses, roaming, unprivileged operation and UDP to an "internet" server.
//! Each test builds its own namespaces with the rig (see `rig/mod.rs`); they need root and
//! skip loudly without it (fail under `CI=true`).

mod rig;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn ping_both(rig: &Rig) {
    rig.assert_ping(PINGABLE_V4.into(), 3);
    rig.assert_ping(PINGABLE_V6.into(), 3);
}

/// Sends a UDP datagram through the tunnel to the internet echo server at `server` and checks
/// the echo: same payload, coming from the server's address, and the server saw the gateway's
/// internet-side address `gw_inet` as the source (the gateway forwarded it through a socket).
#[track_caller]
fn assert_udp_echo(rig: &mut Rig, server: SocketAddr, gw_inet: IpAddr, payload: &[u8]) {
    let reply = rig
        .udp_roundtrip(&rig.peer, server, payload, 5, Duration::from_secs(1))
        .unwrap_or_else(|out| panic!("no UDP echo from {server}:\n{out}"));
    assert_eq!(reply.payload, payload, "echoed payload differs");
    assert_eq!(reply.from, server, "echo came from the wrong address");
    let seen = rig.server_proc(Server::UdpEcho).log();
    let sources: Vec<&str> = seen
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        sources.contains(&gw_inet.to_string().as_str()),
        "echo server saw sources {sources:?}, wanted the gateway's {gw_inet}"
    );
    assert!(
        !sources
            .iter()
            .any(|s| *s == PEER_INNER_V4.to_string() || *s == PEER_INNER_V6.to_string()),
        "a tunnel-inner address leaked to the internet: {sources:?}"
    );
}

/// The gateway initiates: it has `-p` and `-a`, the peer doesn't know the gateway's endpoint.
#[test]
fn handshake_and_ping_v4_v6() {
    let Some(rig) = Rig::builder("handshake_and_ping_v4_v6")
        .gateway_keepalive(Some(2))
        .peer_endpoint(false)
        .start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_both(&rig);
}

/// `-a`: the gateway keeps the tunnel alive on its own. The peer has no keepalive and sends
/// nothing after the handshake, yet keepalive messages (32 bytes each) keep arriving.
#[test]
fn gateway_persistent_keepalive() {
    let Some(rig) = Rig::builder("gateway_persistent_keepalive")
        .gateway_keepalive(Some(1))
        .peer_endpoint(false)
        .peer_keepalive(None)
        .start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let received = || {
        let gw = rig.gateway_keys().public.clone();
        rig.transfer(&rig.wg_dev)
            .into_iter()
            .find(|(key, _, _)| *key == gw)
            .map_or(0, |(_, rx, _)| rx)
    };
    let before = received();
    std::thread::sleep(Duration::from_millis(3500));
    let after = received();
    assert!(
        after >= before + 2 * 32,
        "expected at least two keepalives in 3.5 s with -a 1: received {before} then {after} bytes"
    );
}

/// The gateway has no `-p`: it must learn the endpoint from the peer's handshake.
#[test]
fn responder_only() {
    let Some(mut rig) = Rig::builder("responder_only")
        .gateway_endpoint(false)
        .peer_keepalive(Some(1))
        .start()
    else {
        return;
    };
    assert!(!rig.gateway_args().iter().any(|a| a == "-p"));
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_both(&rig);
    assert!(rig.gateway_alive());
}

/// Peers with keys the gateway doesn't accept get no handshake, and the gateway goes on
/// serving the right peer.
#[test]
fn wrong_peer_key_no_handshake_and_gateway_survives() {
    let Some(mut rig) = Rig::builder("wrong_peer_key_no_handshake_and_gateway_survives").start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let gw_pub = rig.gateway_keys().public.clone();
    // Unknown peer key, right gateway key: passes mac1, fails the peer lookup.
    let (stranger, _) = rig.add_extra_wg_peer("s", PEER_PORT + 1, &gw_pub);
    // Unknown peer key aimed at a wrong gateway key: fails mac1.
    let wrong_gw = KeyPair::generate().public;
    let (misdirected, _) = rig.add_extra_wg_peer("m", PEER_PORT + 2, &wrong_gw);

    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        for dev in [&stranger, &misdirected] {
            let hs = rig.latest_handshakes(dev);
            assert!(
                hs.iter().all(|(_, t)| *t == 0),
                "{dev} got a handshake with a key the gateway doesn't know: {hs:?}"
            );
        }
        assert!(rig.gateway_alive(), "gateway died");
        std::thread::sleep(Duration::from_millis(250));
    }
    for dev in [&stranger, &misdirected] {
        let sent: u64 = rig.transfer(dev).iter().map(|(_, _, tx)| tx).sum();
        assert!(
            sent > 0,
            "{dev} never sent a handshake initiation: test is vacuous"
        );
    }
    ping_both(&rig);
    assert!(rig.gateway_alive(), "gateway died");
}

/// `-k INSECURE -K GUE`: bare IP packets in UDP datagrams from a socat TUN peer.
#[test]
fn raw_ip_mode_ping() {
    let Some(mut rig) = Rig::builder("raw_ip_mode_ping")
        .raw_ip()
        .gateway_endpoint(false)
        .start()
    else {
        return;
    };
    ping_both(&rig);
    assert!(rig.gateway_alive());
}

/// Raw-IP mode without `-p`: the gateway answers whoever sent last, so a peer whose address
/// changes keeps working.
#[test]
fn raw_ip_mode_follows_sender() {
    let Some(mut rig) = Rig::builder("raw_ip_mode_follows_sender")
        .raw_ip()
        .gateway_endpoint(false)
        .start()
    else {
        return;
    };
    rig.assert_ping(PINGABLE_V4.into(), 2);
    rig.roam_peer_v4(PEER_UNDERLAY_V4_ROAMED);
    ping_both(&rig);
}

/// The peer's underlay address changes mid-session (the gateway was started with `-p` for
/// the old one); the gateway follows the authenticated packets to the new address.
#[test]
fn roaming() {
    let Some(mut rig) = Rig::builder("roaming")
        .gateway_keepalive(Some(1))
        .peer_keepalive(Some(1))
        .start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    rig.assert_ping(PINGABLE_V4.into(), 2);
    rig.roam_peer_v4(PEER_UNDERLAY_V4_ROAMED);
    let addrs = rig.peer.ip("-4 -br addr show dev up0");
    assert!(
        addrs.contains(&PEER_UNDERLAY_V4_ROAMED.to_string())
            && !addrs.contains(&format!("{PEER_UNDERLAY_V4}/")),
        "roaming setup failed: {addrs}"
    );
    ping_both(&rig);
}

/// The product's promise: no root. The gateway runs as nobody without capabilities.
#[test]
fn unprivileged_gateway() {
    let Some(mut rig) = Rig::builder("unprivileged_gateway")
        .unprivileged()
        .udp_echo()
        .start()
    else {
        return;
    };
    let pid = rig.gateway().pid();
    let uid = proc_status_field(pid, "Uid").unwrap_or_default();
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "gateway not running as nobody: Uid {uid}"
    );
    let cap_eff = proc_status_field(pid, "CapEff").unwrap_or_default();
    assert_eq!(cap_eff, "0000000000000000", "gateway has capabilities");
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_both(&rig);
    let v4 = SocketAddr::new(INET_V4.into(), UDP_ECHO_PORT);
    let v6 = SocketAddr::new(INET_V6.into(), UDP_ECHO_PORT);
    assert_udp_echo(&mut rig, v4, GW_INET_V4.into(), b"unprivileged v4");
    assert_udp_echo(&mut rig, v6, GW_INET_V6.into(), b"unprivileged v6");
}

/// UDP from the peer reaches an internet-ns echo server through the gateway, both families.
#[test]
fn udp_reaches_internet_echo_server() {
    let Some(mut rig) = Rig::builder("udp_reaches_internet_echo_server")
        .udp_echo()
        .start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let v4 = SocketAddr::new(INET_V4.into(), UDP_ECHO_PORT);
    let v6 = SocketAddr::new(INET_V6.into(), UDP_ECHO_PORT);
    assert_udp_echo(&mut rig, v4, GW_INET_V4.into(), b"hello over v4");
    assert_udp_echo(&mut rig, v6, GW_INET_V6.into(), b"hello over v6");
    let big: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    assert_udp_echo(&mut rig, v4, GW_INET_V4.into(), &big);
}

/// Nothing is lossy inside the rig, so the first datagram of each new flow (a new client
/// socket each time) must be echoed without any retry.
#[test]
fn udp_first_datagram_of_each_flow_is_delivered() {
    let Some(rig) = Rig::builder("udp_first_datagram_of_each_flow_is_delivered")
        .udp_echo()
        .start()
    else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let mut lost = Vec::new();
    for i in 0..6u8 {
        let ip: IpAddr = if i % 2 == 0 {
            INET_V4.into()
        } else {
            INET_V6.into()
        };
        let server = SocketAddr::new(ip, UDP_ECHO_PORT);
        let payload = [b'f', b'l', b'o', b'w', b'0' + i];
        match rig.udp_roundtrip(&rig.peer, server, &payload, 1, Duration::from_secs(2)) {
            Ok(reply) => assert_eq!(reply.payload, payload),
            Err(out) => lost.push(format!("flow {i} to {server}: {}", out.stderr.trim())),
        }
    }
    assert!(
        lost.is_empty(),
        "first datagrams lost:\n{}",
        lost.join("\n")
    );
}

/// WireGuard over an IPv6 underlay, with the gateway's key given as a file (`-f`).
#[test]
fn ipv6_underlay_and_key_file() {
    let Some(rig) = Rig::builder("ipv6_underlay_and_key_file")
        .underlay_v6()
        .key_file()
        .start()
    else {
        return;
    };
    assert!(rig.gateway_args().iter().any(|a| a == "-f"));
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_both(&rig);
}

/// Checks the rig itself, without the tunnel: the internet servers answer the gateway ns
/// directly, and the gateway ns resolves the internet server's name from its own hosts file.
/// When this fails, the other tests' failures say nothing about wgslirpy.
#[test]
fn rig_self_test_servers() {
    let Some(rig) = Rig::builder("rig_self_test_servers")
        .udp_echo()
        .tcp_echo()
        .http_file("hello.txt", "hello from the internet ns\n")
        .iperf3()
        .start()
    else {
        return;
    };
    let hosts = rig.gw.ok(&["getent", "ahosts", INET_HOSTNAME]);
    for ip in [INET_V4.to_string(), INET_V6.to_string()] {
        assert!(
            hosts.contains(&ip),
            "{INET_HOSTNAME} should resolve to {ip}: {hosts}"
        );
    }
    for ip in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let udp = SocketAddr::new(ip, UDP_ECHO_PORT);
        let reply = rig
            .udp_roundtrip(&rig.gw, udp, b"direct", 3, Duration::from_secs(1))
            .unwrap_or_else(|o| panic!("{o}"));
        assert_eq!(reply.payload, b"direct");
        let tcp = SocketAddr::new(ip, TCP_ECHO_PORT);
        let echoed = rig
            .tcp_roundtrip(&rig.gw, tcp, b"direct tcp", Duration::from_secs(5))
            .unwrap_or_else(|o| panic!("{o}"));
        assert_eq!(echoed, b"direct tcp");
        let url = format!("http://{}/hello.txt", SocketAddr::new(ip, HTTP_PORT));
        let (status, body) = rig
            .http_get(&rig.gw, &url, Duration::from_secs(5))
            .unwrap_or_else(|o| panic!("{o}"));
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"hello from the internet ns\n"[..])
        );
    }
    let port = IPERF3_PORT.to_string();
    let inet = INET_V4.to_string();
    let iperf = ["iperf3", "-c", &inet, "-p", &port, "-n", "1M"];
    rig.gw.run(&iperf).expect_success();
    // The internet ns has no route to the peer's underlay: only the gateway can reach it.
    let ping = rig.ping(&rig.inet, PEER_UNDERLAY_V4.into(), 1);
    assert_eq!(
        ping.received, 0,
        "internet ns reaches the peer: {}",
        ping.output
    );
}
