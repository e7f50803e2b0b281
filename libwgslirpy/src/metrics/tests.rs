//! Tests of the exposition and of the HTTP responder, on loopback.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::*;
use crate::config::Key;
use crate::driver::control::Request as Control;
use crate::tunnel::TunnelControl;

fn snapshot() -> RouterSnapshot {
    let mut snapshot = RouterSnapshot::default();
    snapshot.stats.packets_in = 10;
    snapshot.stats.packets_out = 9;
    snapshot.stats.dropped_policy = 3;
    snapshot.stats.udp_flows_opened = 2;
    snapshot.stats.dns_nxdomain = 1;
    snapshot.occupancy.tcp_connections = 4;
    snapshot.peers = vec![crate::core::PeerStats {
        public_key: Some(Key([1; 32])),
        counters: crate::core::PeerCounters {
            packets_from: 10,
            bytes_from: 840,
            packets_to: 9,
            bytes_to: 760,
        },
        occupancy: crate::core::PeerOccupancy {
            tcp_connections: 4,
            ..Default::default()
        },
    }];
    snapshot
}

fn peer() -> PeerStatus {
    PeerStatus {
        public_key: Key([1; 32]),
        endpoint: None,
        rx_bytes: 1000,
        tx_bytes: 2000,
        since_last_handshake: Some(Duration::from_secs(5)),
        dropped_source: 2,
        handshakes: 3,
    }
}

#[test]
fn exposition_has_the_counters_with_help_and_type() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let tunnel = crate::tunnel::TunnelStatus {
        peers: vec![peer()],
        dropped_no_session: 5,
    };
    let text = render(&snapshot(), &tunnel, now);
    let key = Key([1; 32]).to_base64();
    for line in [
        "# TYPE wgslirpy_packets_total counter".to_owned(),
        "wgslirpy_packets_total{direction=\"rx\"} 10".to_owned(),
        "wgslirpy_dropped_packets_total{reason=\"policy\"} 3".to_owned(),
        "# TYPE wgslirpy_flows_active gauge".to_owned(),
        "wgslirpy_flows_active{protocol=\"tcp\"} 4".to_owned(),
        "wgslirpy_flows_created_total{protocol=\"udp\"} 2".to_owned(),
        "wgslirpy_dns_answers_total{result=\"nxdomain\"} 1".to_owned(),
        format!("wgslirpy_peer_bytes_total{{peer=\"{key}\",direction=\"rx\"}} 1000"),
        format!("wgslirpy_peer_bytes_total{{peer=\"{key}\",direction=\"tx\"}} 2000"),
        format!("wgslirpy_peer_last_handshake_timestamp_seconds{{peer=\"{key}\"}} 999995.000"),
        "wgslirpy_peers 1".to_owned(),
        "wgslirpy_dropped_packets_total{reason=\"spoofed_source\"} 2".to_owned(),
        "wgslirpy_dropped_packets_total{reason=\"no_session\"} 5".to_owned(),
        format!("wgslirpy_peer_handshakes_total{{peer=\"{key}\"}} 3"),
        format!("wgslirpy_peer_packets_total{{peer=\"{key}\",direction=\"rx\"}} 10"),
        format!("wgslirpy_peer_packets_total{{peer=\"{key}\",direction=\"tx\"}} 9"),
        format!("wgslirpy_peer_flows_active{{peer=\"{key}\",protocol=\"tcp\"}} 4"),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    // Every sample belongs to a family declared just before it, with help.
    let mut declared = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(declared.insert(name.to_owned()), "{name} declared twice");
            assert!(name.starts_with("wgslirpy_"), "{name}");
            let counter = rest.ends_with(" counter");
            assert_eq!(
                counter,
                name.ends_with("_total"),
                "{name}: _total iff counter"
            );
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(name), "{name} sampled before # TYPE");
        }
    }
}

#[test]
fn label_values_are_escaped() {
    let mut e = Exposition::default();
    e.sample("x", &[("l", "a\"b\\c\nd")], 1);
    assert_eq!(e.out, "x{l=\"a\\\"b\\\\c\\nd\"} 1\n");
}

#[test]
fn request_heads_parse() {
    assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
    assert_eq!(
        parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
        Some(Ok(Request {
            method: "GET".into(),
            path: "/metrics".into()
        }))
    );
    assert_eq!(parse_head(b"hello\r\n\r\n"), Some(Err(())));
    assert_eq!(parse_head(b"GET / SPDY/3\r\n\r\n"), Some(Err(())));
    assert_eq!(parse_head(b"\xff\xfe\r\n\r\n"), Some(Err(())));
}

/// A metrics server on loopback whose "router task" answers snapshots
/// until `stop` is dropped.
async fn server() -> (SocketAddr, tokio::task::JoinHandle<()>, mpsc::Sender<()>) {
    let (requests, mut control) = mpsc::channel(4);
    let (stop, mut stopped) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(request) = control.recv() => {
                    if let Control::Snapshot(reply) = request {
                        let _ = reply.send(snapshot());
                    }
                }
                _ = stopped.recv() => return,
            }
        }
    });
    let handle = GatewayHandle {
        requests: vec![requests],
        tunnel: TunnelControl::detached(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(serve(listener, handle)), stop)
}

async fn get(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn serves_metrics_healthz_and_404() {
    let (addr, _server, stop) = server().await;
    let metrics = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    assert!(metrics.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")));
    assert!(metrics.contains("Connection: close\r\n"));
    assert!(metrics.contains("\nwgslirpy_packets_total{direction=\"rx\"} 10\n"));

    let health = get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"));
    let head = get(addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
    assert!(head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"));

    assert!(
        get(addr, "GET / HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404 ")
    );
    let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"));
    let junk = get(addr, &"x".repeat(MAX_REQUEST_HEAD + 10)).await;
    assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");

    // Once the router task is gone, the health check says so.
    drop(stop);
    let mut down = String::new();
    for _ in 0..100 {
        down = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        if down.starts_with("HTTP/1.1 503 ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(down.starts_with("HTTP/1.1 503 "), "{down}");
}
