//! End-to-end tests of UDP beyond the basics: 60,000-byte datagrams cross the tunnel in
//! fragments both ways, and a closed port's ICMP error reaches the peer. Need root (skip
//! loudly without it, fail under `CI=true`).

mod rig;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn largest_datagrams_cross_in_fragments_both_ways() {
    let Some(rig) = Rig::builder("udp_fragments").udp_echo().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let payload: Vec<u8> = (0..60000u32).map(|i| (i * 31 % 251) as u8).collect();
    for server in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let dst = SocketAddr::new(server, UDP_ECHO_PORT);
        let reply = rig
            .udp_roundtrip(&rig.peer, dst, &payload, 3, Duration::from_secs(2))
            .unwrap_or_else(|out| panic!("no echo of 60000 bytes from {dst}: {out:?}"));
        assert_eq!(reply.payload.len(), payload.len());
        assert!(reply.payload == payload, "{dst}: payload differs");
    }
}

/// A connected UDP socket on the peer learns that nothing listens on the far port
/// (ECONNREFUSED), because the gateway relays the ICMP error it got.
#[test]
fn closed_port_is_reported_to_the_peer() {
    let Some(rig) = Rig::builder("udp_port_unreachable").start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    const CLIENT: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.connect((sys.argv[1], 9))
for attempt in range(3):
    try:
        s.send(b"anyone there?")
        s.recv(100)
        print("reply")
    except ConnectionRefusedError:
        print("refused")
        break
    except socket.timeout:
        print("timeout")
"#;
    for server in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let out = rig
            .peer
            .run(&["python3", "-c", CLIENT, &server.to_string()]);
        assert!(out.stdout.contains("refused"), "{server}: {out:?}");
    }
}
