//! End-to-end tests of UDP beyond the basics: 60,000-byte datagrams cross the tunnel in
//! fragments both ways, and a closed port's ICMP error reaches the peer. Need root (skip
//! loudly without it, fail under `CI=true`).

mod rig;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Eight datagrams each way per address family: with the gateway's default two router
/// shards (on two cores), fragments go by their IP identification, so about half of the
/// datagrams are reassembled on the shard that does not own their flow and handed on.
#[test]
fn largest_datagrams_cross_in_fragments_both_ways() {
    let Some(rig) = Rig::builder("udp_fragments").udp_echo().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    for server in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let dst = SocketAddr::new(server, UDP_ECHO_PORT);
        for n in 0..8u32 {
            let payload: Vec<u8> = (0..60000u32).map(|i| ((i + n) * 31 % 251) as u8).collect();
            let reply = rig
                .udp_roundtrip(&rig.peer, dst, &payload, 3, Duration::from_secs(2))
                .unwrap_or_else(|out| panic!("no echo of 60000 bytes from {dst}: {out:?}"));
            assert_eq!(reply.payload.len(), payload.len());
            assert!(
                reply.payload == payload,
                "{dst}, datagram {n}: payload differs"
            );
        }
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

/// Sends one datagram of each size from the peer to the echo server and checks every echo
/// byte for byte. The data is made by the script itself (no size limit from argv).
const SIZES_CLIENT: &str = r#"
import socket, sys
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(2.0)
for size in map(int, sys.argv[2:]):
    data = bytes((i * 7 + size) % 251 for i in range(size))
    for attempt in range(3):
        s.sendto(data, (host, 7))
        try:
            reply = s.recv(65535)
        except socket.timeout:
            continue
        if reply == data:
            print("ok", size, flush=True)
            break
        print("differs", size, len(reply), flush=True)
        break
    else:
        print("lost", size, flush=True)
"#;

#[test]
fn echo_of_every_size_from_1_to_65507_bytes() {
    let Some(rig) = Rig::builder("udp_sizes").udp_echo().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    // Around the tunnel MTU (1420 bytes less 28 or 48 of headers), and the largest.
    let v4_sizes = ["1", "1392", "1393", "9000", "65507"];
    let v6_sizes = ["1", "1372", "1373", "9000", "65507", "65527"];
    for (server, sizes) in [
        (IpAddr::from(INET_V4), &v4_sizes[..]),
        (IpAddr::from(INET_V6), &v6_sizes[..]),
    ] {
        let mut argv = vec!["python3", "-c", SIZES_CLIENT];
        let host = server.to_string();
        argv.push(&host);
        argv.extend(sizes.iter());
        let out = rig.peer.run_timeout(&argv, Duration::from_secs(40));
        for size in sizes.iter() {
            assert!(
                out.stdout.contains(&format!("ok {size}\n")),
                "{server} size {size}: {out:?}"
            );
        }
    }
}

/// Twenty flows at once, each with its own socket on the peer: every one gets its own
/// echo, and nothing else.
#[test]
fn twenty_concurrent_flows_each_get_their_own_replies() {
    const CLIENTS: &str = r#"
import socket, sys, threading
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
lock = threading.Lock()
def client(i):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for attempt in range(3):
        s.sendto(b"flow-%d" % i, (host, 7))
        try:
            data = s.recv(100)
        except socket.timeout:
            continue
        with lock:
            print(i, data.decode(), flush=True)
        return
threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
for t in threads: t.start()
for t in threads: t.join()
"#;
    let Some(rig) = Rig::builder("udp_twenty_flows").udp_echo().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    for server in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let out = rig
            .peer
            .run(&["python3", "-c", CLIENTS, &server.to_string()]);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 20, "{server}: {out:?}");
        for line in lines {
            let (i, reply) = line.split_once(' ').unwrap();
            assert_eq!(reply, format!("flow-{i}"), "{server}: {line}");
        }
    }
}

/// Endpoint-independent mapping and filtering (RFC 4787): one peer socket reaches two
/// servers through one external port, as both servers see, and a third host that the peer
/// never sent to reaches the peer through that port (what hole punching relies on).
#[test]
fn one_mapping_for_all_destinations_and_replies_from_anyone() {
    const PEER_SOCKET: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40000))
s.settimeout(1.0)
server = sys.argv[1]
for port in (7, 7007):
    for attempt in range(3):
        s.sendto(b"hello", (server, port))
        try:
            s.recvfrom(100)
            break
        except socket.timeout:
            pass
print("sent", flush=True)
s.settimeout(10.0)
data, sender = s.recvfrom(100)
print("unsolicited", data.decode(), sender[0], sender[1], flush=True)
"#;
    let Some(mut rig) = Rig::builder("udp_mapping").udp_echo().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let inet = rig.inet.clone();
    let script = rig.path("udp_echo.py");
    let second = rig.spawn(&inet, "udp-echo-7007", &["python3", &script, "7007"]);
    let peer = rig.peer.clone();
    let client = rig.spawn(
        &peer,
        "peer-socket",
        &["python3", "-c", PEER_SOCKET, &INET_V4.to_string()],
    );
    let sent = wait_until(Duration::from_secs(10), || {
        rig.proc(client).log().contains("sent").then_some(())
    });
    assert!(sent.is_some(), "{}", rig.proc(client).log());

    // Both servers saw the gateway's address and one and the same port.
    let seen = |log: String| -> String {
        let line = log
            .lines()
            .find(|l| l.starts_with(&GW_INET_V4.to_string()))
            .unwrap_or("")
            .to_owned();
        line.split_whitespace().nth(1).unwrap_or("").to_owned()
    };
    let port_a = seen(rig.server_proc(Server::UdpEcho).log());
    let port_b = seen(rig.proc(second).log());
    assert!(
        !port_a.is_empty() && port_a == port_b,
        "ports seen: {port_a:?} and {port_b:?}"
    );

    // A third party, never contacted, sends to that external port and reaches the peer.
    const THIRD: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.sendto(b"knock", (sys.argv[1], int(sys.argv[2])))
"#;
    rig.inet
        .run(&["python3", "-c", THIRD, &GW_INET_V4.to_string(), &port_a]);
    let got = wait_until(Duration::from_secs(10), || {
        let log = rig.proc(client).log();
        log.lines()
            .find(|l| l.starts_with("unsolicited"))
            .map(str::to_owned)
    });
    assert_eq!(
        got.as_deref(),
        Some(format!("unsolicited knock {INET_V4} 9999").as_str()),
        "{}",
        rig.proc(client).log()
    );
}
