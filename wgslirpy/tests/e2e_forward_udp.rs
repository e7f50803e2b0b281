//! End-to-end tests of reverse UDP forwarding (`-u HOST,SOURCE,DEST`): clients in the
//! "internet" namespace reach a server inside the tunnel through the gateway's HOST port,
//! each getting only its own replies, with and without a SOURCE override, over IPv4 and
//! IPv6. Need root (skip loudly without it, fail under `CI=true`).

mod rig;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use rig::*;

/// The server inside the tunnel, on the peer: answers each datagram with
/// "<source the server saw> <payload>".
const TUNNEL_SERVER: &str = r#"
import socket, select, sys
socks = []
for family, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, 7000))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        host = "[%s]" % peer[0] if ":" in peer[0] else peer[0]
        s.sendto(("%s:%d " % (host, peer[1])).encode() + data, peer)
"#;

/// Ten clients at once, each with its own socket, send their own number to the HOST
/// address and print what comes back: "<client number> <source the server saw> <payload>".
const CLIENTS: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
lock = threading.Lock()
def client(i):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for attempt in range(3):
        s.sendto(b"client-%d" % i, (host, port))
        try:
            data, _ = s.recvfrom(65535)
        except socket.timeout:
            continue
        with lock:
            print(i, data.decode(), flush=True)
        # Anything else that arrives would be someone else's reply.
        s.settimeout(0.5)
        try:
            extra, _ = s.recvfrom(65535)
            with lock:
                print(i, "EXTRA", extra.decode(), flush=True)
        except socket.timeout:
            pass
        return
threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
for t in threads: t.start()
for t in threads: t.join()
"#;

/// Starts the gateway with `forwards` and the server inside the tunnel.
fn rig_with_forwards(name: &str, forwards: &[&str]) -> Option<Rig> {
    let args: Vec<&str> = forwards.iter().flat_map(|f| ["-u", *f]).collect();
    let mut rig = Rig::builder(name).gateway_args(&args).start()?;
    rig.wait_handshake(Duration::from_secs(10));
    let peer = rig.peer.clone();
    let (v4, v6) = (PEER_INNER_V4.to_string(), PEER_INNER_V6.to_string());
    rig.spawn(
        &peer,
        "tunnel-server",
        &["python3", "-c", TUNNEL_SERVER, &v4, &v6],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !peer
        .run(&["ss", "-Huln", "sport = :7000"])
        .stdout
        .contains(":7000")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "tunnel server did not start"
        );
        std::thread::sleep(POLL);
    }
    Some(rig)
}

/// Runs the ten clients against `host` and returns, per client, the source address the
/// server inside the tunnel saw. Asserts that every client got exactly its own reply.
fn run_clients(rig: &Rig, host: SocketAddr) -> Vec<SocketAddr> {
    let out = rig.inet.run(&[
        "python3",
        "-c",
        CLIENTS,
        &host.ip().to_string(),
        &host.port().to_string(),
    ]);
    assert!(out.success(), "{out:?}");
    assert!(
        !out.stdout.contains("EXTRA"),
        "a client got another's reply: {out:?}"
    );
    let mut seen = Vec::new();
    for line in out.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [client, source, payload] = fields[..] else {
            panic!("unexpected line {line:?}");
        };
        assert_eq!(payload, format!("client-{client}"), "{line}");
        seen.push(source.parse().unwrap());
    }
    assert_eq!(seen.len(), 10, "not every client got its reply: {out:?}");
    seen
}

#[test]
fn reverse_udp_without_source_shows_the_clients_address() {
    let Some(rig) = rig_with_forwards(
        "fwd_udp_plain",
        &[
            &format!("{GW_INET_V4}:5000,,{PEER_INNER_V4}:7000"),
            &format!("[{GW_INET_V6}]:5000,,[{PEER_INNER_V6}]:7000"),
        ],
    ) else {
        return;
    };
    for (host, client_ip) in [
        (
            SocketAddr::new(GW_INET_V4.into(), 5000),
            std::net::IpAddr::from(INET_V4),
        ),
        (SocketAddr::new(GW_INET_V6.into(), 5000), INET_V6.into()),
    ] {
        let sources = run_clients(&rig, host);
        assert!(sources.iter().all(|s| s.ip() == client_ip), "{sources:?}");
        assert_eq!(
            sources.iter().collect::<HashSet<_>>().len(),
            10,
            "{sources:?}"
        );
    }
}

#[test]
fn reverse_udp_with_source_override_keeps_senders_apart() {
    let source_v4 = SocketAddr::new(PINGABLE_V4.into(), 53);
    let source_v6 = SocketAddr::new(PINGABLE_V6.into(), 0);
    let Some(rig) = rig_with_forwards(
        "fwd_udp_source",
        &[
            &format!("{GW_INET_V4}:5001,{source_v4},{PEER_INNER_V4}:7000"),
            &format!("[{GW_INET_V6}]:5001,{source_v6},[{PEER_INNER_V6}]:7000"),
        ],
    ) else {
        return;
    };
    let v4 = run_clients(&rig, SocketAddr::new(GW_INET_V4.into(), 5001));
    assert!(v4.iter().all(|s| s.ip() == source_v4.ip()), "{v4:?}");
    assert!(v4.contains(&source_v4), "{v4:?}");
    assert_eq!(v4.iter().collect::<HashSet<_>>().len(), 10, "{v4:?}");

    let v6 = run_clients(&rig, SocketAddr::new(GW_INET_V6.into(), 5001));
    assert!(v6.iter().all(|s| s.ip() == source_v6.ip()), "{v6:?}");
    assert!(
        v6.iter().all(|s| s.port() >= 49152),
        "round-robin ports: {v6:?}"
    );
    assert_eq!(v6.iter().collect::<HashSet<_>>().len(), 10, "{v6:?}");
}
