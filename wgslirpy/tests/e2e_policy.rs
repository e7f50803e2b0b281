//! End-to-end tests of the access policy: the gateway host's own services are out of the
//! peer's reach unless opened, and `--host-address` reaches the host's loopback on
//! purpose. Need root (skip loudly without it, fail under `CI=true`).

mod rig;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a UDP echo server on port 7 of every address of the gateway's namespace,
/// loopback included.
fn echo_on_gateway_host(rig: &mut Rig) {
    let gw = rig.gw.clone();
    let script = rig.path("udp_echo.py");
    rig.spawn(&gw, "gw-udp-echo", &["python3", &script, "7"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gw.run(&["ss", "-Huln", "sport = :7"]).stdout.contains(":7") {
        assert!(
            std::time::Instant::now() < deadline,
            "echo server did not start"
        );
        std::thread::sleep(POLL);
    }
}

fn udp_echo(rig: &Rig, dst: SocketAddr, payload: &[u8]) -> Option<UdpReply> {
    rig.udp_roundtrip(&rig.peer, dst, payload, 2, Duration::from_millis(700))
        .ok()
}

#[test]
fn gateway_host_is_denied_by_default_and_allow_opens_a_port() {
    let Some(mut rig) = Rig::builder("policy_default")
        .udp_echo()
        .defer_gateway()
        .start()
    else {
        return;
    };
    echo_on_gateway_host(&mut rig);
    rig.start_gateway();
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let host_service = SocketAddr::new(GW_INET_V4.into(), 7);
    assert_eq!(udp_echo(&rig, host_service, b"let me in"), None);
    // The peer is told why: ICMP "communication administratively prohibited".
    let ping = rig.ping(&rig.peer, GW_INET_V4.into(), 1);
    assert_eq!(ping.received, 0);
    assert!(
        ping.output.stdout.contains("Packet filtered"),
        "{:?}",
        ping.output
    );
    // The internet is still reachable.
    let internet = SocketAddr::new(INET_V4.into(), UDP_ECHO_PORT);
    assert!(udp_echo(&rig, internet, b"hello").is_some());

    rig.stop_gateway(libc::SIGTERM, Duration::from_secs(5));
    let mut args = rig.gateway_args().to_vec();
    args.extend(["--allow".to_string(), format!("{GW_INET_V4}/32:7")]);
    rig.set_gateway_args(args);
    rig.start_gateway();
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let reply = udp_echo(&rig, host_service, b"let me in").expect("allowed port answers");
    assert_eq!(reply.payload, b"let me in");
    // The rule names a port, so pings stay denied.
    assert_eq!(rig.ping(&rig.peer, GW_INET_V4.into(), 1).received, 0);
}

#[test]
fn host_address_reaches_the_hosts_loopback() {
    let host_address: IpAddr = "198.19.77.9".parse().unwrap();
    let Some(mut rig) = Rig::builder("policy_host_address")
        .gateway_args(&["--host-address", "198.19.77.9"])
        .defer_gateway()
        .start()
    else {
        return;
    };
    echo_on_gateway_host(&mut rig);
    rig.start_gateway();
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let reply = udp_echo(&rig, SocketAddr::new(host_address, 7), b"to the host")
        .expect("the host's loopback answers through --host-address");
    assert_eq!(reply.payload, b"to the host");
    assert_eq!(reply.from, SocketAddr::new(host_address, 7));
    // The echo server saw the datagram arrive on loopback.
    let log = rig.gw.run(&[
        "sh",
        "-c",
        &format!("cat {}/gw-udp-echo-*.log", rig.dir.display()),
    ]);
    assert!(log.stdout.contains("127.0.0.1"), "{log:?}");
}
