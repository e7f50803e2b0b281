//! Prometheus metrics and a health check over HTTP (`--metrics ADDR:PORT`).
//!
//! # Theory of operation
//!
//! A tiny HTTP/1.1 responder on tokio, not a web framework: it serves two
//! read-only paths to a scraper on a trusted network, so it needs no
//! routing, keep-alive, chunking or TLS. Each connection is one request:
//! the request head is read (at most [`MAX_REQUEST_HEAD`] bytes, within
//! [`REQUEST_TIMEOUT`] for the whole exchange), answered with
//! `Content-Length` and `Connection: close`, and closed. At most
//! [`MAX_CONNECTIONS`] are served at once; more are closed at once, so a
//! slow or hostile client costs a few KiB and one task, never the router.
//!
//! - `GET /metrics`: the Prometheus text exposition format, version 0.0.4
//!   ([`render`]): the router's counters (a snapshot copied by the router
//!   task on request, see [`crate::driver::control`]) and each WireGuard
//!   peer's counters from gotatun.
//! - `GET /healthz`: `200 ok` while the router task answers, `503` once it
//!   is shutting down or gone.
//! - `HEAD` works on both; other methods get 405, other paths 404, a
//!   request that is not HTTP 400.
//!
//! # Naming
//! Prometheus conventions: every name starts with `wgslirpy_`, counters
//! end in `_total`, units are base units in the name (`_bytes`,
//! `_seconds`), and what varies within one quantity is a label
//! (`protocol`, `reason`, `result`, `direction`, `peer`).

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::driver::{GatewayHandle, RouterSnapshot};
use crate::tunnel::{PeerStatus, TunnelStatus};

/// Connections served at once; more are closed without an answer.
pub const MAX_CONNECTIONS: usize = 4;
/// The longest request head read; a longer one gets 400.
pub const MAX_REQUEST_HEAD: usize = 4096;
/// The longest one request may take, reading and answering.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The `Content-Type` of the exposition format served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` and `/healthz` on `listener` for the gateway behind
/// `handle`, until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, handle: GatewayHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("metrics: too many connections; closing a new one");
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = tokio::time::timeout(REQUEST_TIMEOUT, exchange(stream, &handle))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            {
                tracing::debug!(%error, "metrics: request not answered");
            }
        });
    }
}

/// Reads one request from `stream`, answers it and closes.
async fn exchange(mut stream: TcpStream, handle: &GatewayHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let request = loop {
        if let Some(request) = parse_head(&head) {
            break request;
        }
        if head.len() >= MAX_REQUEST_HEAD {
            break Err(());
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        head.truncate(MAX_REQUEST_HEAD);
    };
    let response = match request {
        Ok(request) => answer(&request, handle).await,
        Err(()) => Response::text(400, "Bad Request", "bad request\n"),
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

/// A request line, as far as we care.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// The path without any query string.
    path: String,
}

/// The request line of a complete head (one ending in an empty line), or
/// `None` while the head is incomplete. `Err` for a head that is not HTTP.
fn parse_head(head: &[u8]) -> Option<Result<Request, ()>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Be lenient with bare newlines, as curl never sends but people do.
        head.windows(2).position(|w| w == b"\n\n")
    })?;
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return Some(Err(()));
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Err(()));
    };
    if !version.starts_with("HTTP/1.") {
        return Some(Err(()));
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    }))
}

/// An answer: status, content type, body, and whether to send the body.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            head_only: false,
            allow: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

async fn answer(request: &Request, handle: &GatewayHandle) -> Response {
    let known = matches!(request.path.as_str(), "/metrics" | "/healthz");
    if !known {
        return Response::text(404, "Not Found", "not found: try /metrics or /healthz\n");
    }
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response = Response::text(405, "Method Not Allowed", "use GET\n");
            response.allow = true;
            return response;
        }
    };
    let snapshot = handle.router_snapshot().await;
    let mut response = match (request.path.as_str(), snapshot) {
        ("/healthz", Ok(snapshot)) if !snapshot.shutting_down => Response::text(200, "OK", "ok\n"),
        ("/healthz", Ok(_)) => Response::text(503, "Service Unavailable", "shutting down\n"),
        (_, Ok(snapshot)) => {
            let tunnel = handle.tunnel_status().await;
            Response {
                content_type: CONTENT_TYPE,
                ..Response::text(200, "OK", &render(&snapshot, &tunnel, SystemTime::now()))
            }
        }
        (_, Err(_)) => Response::text(503, "Service Unavailable", "not running\n"),
    };
    response.head_only = head_only;
    response
}

/// The Prometheus text exposition (version 0.0.4) of `router` and `peers`;
/// `now` turns gotatun's "time since the last handshake" into a timestamp.
pub fn render(router: &RouterSnapshot, tunnel: &TunnelStatus, now: SystemTime) -> String {
    let peers = &tunnel.peers;
    let mut e = Exposition::default();
    let s = &router.stats;
    let o = &router.occupancy;

    e.family(
        "wgslirpy_build_info",
        Kind::Gauge,
        "Always 1; the version is a label.",
    );
    e.sample(
        "wgslirpy_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    peer_families(&mut e, peers, now);
    router_peer_families(&mut e, &router.peers);

    e.family(
        "wgslirpy_packets_total",
        Kind::Counter,
        "IP packets from peers (rx) and queued for peers (tx), all peers together.",
    );
    e.sample(
        "wgslirpy_packets_total",
        &[("direction", "rx")],
        s.packets_in,
    );
    e.sample(
        "wgslirpy_packets_total",
        &[("direction", "tx")],
        s.packets_out,
    );

    e.family(
        "wgslirpy_dropped_packets_total",
        Kind::Counter,
        "Packets dropped, by reason.",
    );
    let drops = [
        ("malformed", s.dropped_malformed),
        ("unsupported", s.dropped_unsupported),
        ("policy", s.dropped_policy),
        ("limit", s.tcp_refused_limit),
        ("queue_full", s.dropped_queue_full),
        ("too_big", s.dropped_too_big),
        ("fragment", s.dropped_fragments),
        ("tcp_invalid", s.tcp_segments_dropped),
        ("tcp_stray", s.tcp_stray_segments),
        ("dns_invalid", s.dns_dropped),
        ("forward", s.dropped_forward),
        ("shutdown", s.dropped_shutdown),
        ("no_peer", s.dropped_no_peer),
        (
            "spoofed_source",
            peers.iter().map(|p| p.dropped_source).sum::<u64>(),
        ),
        ("no_session", tunnel.dropped_no_session),
    ];
    for (reason, value) in drops {
        e.sample(
            "wgslirpy_dropped_packets_total",
            &[("reason", reason)],
            value,
        );
    }

    e.family(
        "wgslirpy_flows_active",
        Kind::Gauge,
        "Flows open now, by protocol (TCP includes TIME-WAIT; ICMP counts echo identities).",
    );
    for (protocol, value) in [
        ("tcp", o.tcp_connections),
        ("udp", o.udp_flows),
        ("icmp", o.icmp_ids),
    ] {
        e.sample("wgslirpy_flows_active", &[("protocol", protocol)], value);
    }
    e.family(
        "wgslirpy_flows_created_total",
        Kind::Counter,
        "Flows created, by protocol (TCP: connects for peers' SYNs and -t connections).",
    );
    for (protocol, value) in [
        ("tcp", s.tcp_connects + s.tcp_forward_accepted),
        ("udp", s.udp_flows_opened),
        ("icmp", s.icmp_ids_opened),
    ] {
        e.sample(
            "wgslirpy_flows_created_total",
            &[("protocol", protocol)],
            value,
        );
    }
    e.family(
        "wgslirpy_flows_evicted_total",
        Kind::Counter,
        "Least recently used flows (for TCP, the oldest pending connects) closed because their peer's table was full.",
    );
    e.sample(
        "wgslirpy_flows_evicted_total",
        &[("protocol", "udp")],
        s.udp_flows_evicted,
    );
    e.sample(
        "wgslirpy_flows_evicted_total",
        &[("protocol", "icmp")],
        s.icmp_ids_evicted,
    );
    e.sample(
        "wgslirpy_flows_evicted_total",
        &[("protocol", "tcp_pending")],
        s.tcp_pending_evicted,
    );

    gauge(
        &mut e,
        "wgslirpy_tcp_pending_connects",
        "TCP connects waiting for their destination.",
        o.tcp_pending_connects,
    );
    gauge(
        &mut e,
        "wgslirpy_dns_queries_in_flight",
        "DNS queries waiting for the resolver or the nameservers.",
        o.dns_queries,
    );
    gauge(
        &mut e,
        "wgslirpy_reassembly_bytes",
        "Bytes of fragments held for reassembly, overheads included.",
        o.reassembly_bytes,
    );
    gauge(
        &mut e,
        "wgslirpy_transmit_queue_packets",
        "Packets waiting for the tunnel.",
        o.transmit_queue,
    );

    e.family(
        "wgslirpy_tcp_events_total",
        Kind::Counter,
        "TCP connection events, by kind.",
    );
    for (event, value) in [
        ("established", s.tcp_established),
        ("closed", s.tcp_closed),
        ("connect_failed", s.tcp_connect_failures),
        ("connect_timeout", s.tcp_connect_timeouts),
        ("idle_reset", s.tcp_idle_closed),
        ("retransmit_timeout", s.tcp_retransmit_timeouts),
        ("reset_sent", s.tcp_resets_sent),
        ("retransmit", s.tcp_retransmits),
        ("fast_retransmit", s.tcp_fast_retransmits),
    ] {
        e.sample("wgslirpy_tcp_events_total", &[("event", event)], value);
    }

    counter(
        &mut e,
        "wgslirpy_dns_queries_total",
        "Datagrams to the DNS server (-D) over UDP, and queries over TCP.",
        s.dns_queries,
    );
    e.family(
        "wgslirpy_dns_answers_total",
        Kind::Counter,
        "DNS answers by result (servfail includes timeouts and over_capacity).",
    );
    for (result, value) in [
        ("resolved", s.dns_resolved),
        ("forwarded", s.dns_forwarded),
        ("nxdomain", s.dns_nxdomain),
        ("servfail", s.dns_servfail),
        ("error", s.dns_errors),
        ("timeout", s.dns_timeouts),
        ("over_capacity", s.dns_over_capacity),
        ("truncated", s.dns_truncated),
    ] {
        e.sample("wgslirpy_dns_answers_total", &[("result", result)], value);
    }

    e.family(
        "wgslirpy_forward_connections_total",
        Kind::Counter,
        "Connections accepted on -t forwards, by outcome.",
    );
    for (result, value) in [
        ("opened", s.tcp_forward_accepted),
        ("dropped", s.tcp_forward_dropped),
        ("refused", s.tcp_forward_refused),
        ("timeout", s.tcp_forward_timeouts),
    ] {
        e.sample(
            "wgslirpy_forward_connections_total",
            &[("result", result)],
            value,
        );
    }
    e.family(
        "wgslirpy_forward_datagrams_total",
        Kind::Counter,
        "Datagrams carried by -u forwards: into the tunnel (in) and back (out).",
    );
    e.sample(
        "wgslirpy_forward_datagrams_total",
        &[("direction", "in")],
        s.forward_datagrams_in,
    );
    e.sample(
        "wgslirpy_forward_datagrams_total",
        &[("direction", "out")],
        s.forward_datagrams_out,
    );

    e.family(
        "wgslirpy_icmp_echo_replies_total",
        Kind::Counter,
        "Echo replies to peers: answered here (pingable) or forwarded from the network.",
    );
    e.sample(
        "wgslirpy_icmp_echo_replies_total",
        &[("source", "local")],
        s.echo_replies,
    );
    e.sample(
        "wgslirpy_icmp_echo_replies_total",
        &[("source", "network")],
        s.echo_replies_forwarded,
    );
    counter(
        &mut e,
        "wgslirpy_udp_errors_relayed_total",
        "ICMP errors about UDP datagrams relayed to peers.",
        s.udp_errors_relayed,
    );
    counter(
        &mut e,
        "wgslirpy_fragmented_packets_total",
        "Packets for peers split into fragments to fit the MTU.",
        s.packets_fragmented,
    );
    counter(
        &mut e,
        "wgslirpy_reassembled_datagrams_total",
        "Datagrams from peers put back together from fragments.",
        s.datagrams_reassembled,
    );
    e.out
}

/// The per-peer families that the router keeps: inner packets each way,
/// and each peer's flows. The peer of raw IP mode has no key and is
/// labelled `raw-ip`.
fn router_peer_families(e: &mut Exposition, peers: &[crate::core::PeerStats]) {
    let keys: Vec<String> = peers
        .iter()
        .map(|p| {
            p.public_key
                .map_or_else(|| "raw-ip".to_owned(), |k| k.to_base64())
        })
        .collect();
    e.family(
        "wgslirpy_peer_packets_total",
        Kind::Counter,
        "Inner IP packets from (rx) and queued for (tx) each peer.",
    );
    for (peer, key) in peers.iter().zip(&keys) {
        e.sample(
            "wgslirpy_peer_packets_total",
            &[("peer", key), ("direction", "rx")],
            peer.counters.packets_from,
        );
        e.sample(
            "wgslirpy_peer_packets_total",
            &[("peer", key), ("direction", "tx")],
            peer.counters.packets_to,
        );
    }
    e.family(
        "wgslirpy_peer_flows_active",
        Kind::Gauge,
        "Each peer's flows now, by protocol; the limits apply per peer.",
    );
    for (peer, key) in peers.iter().zip(&keys) {
        let o = &peer.occupancy;
        for (protocol, count) in [
            ("tcp", o.tcp_connections),
            ("tcp_pending", o.tcp_pending_connects),
            ("udp", o.udp_flows),
            ("icmp", o.icmp_ids),
            ("dns", o.dns_queries),
        ] {
            e.sample(
                "wgslirpy_peer_flows_active",
                &[("peer", key), ("protocol", protocol)],
                count,
            );
        }
    }
}

/// The per-peer families from gotatun's device: bytes on the wire and the
/// last handshake.
fn peer_families(e: &mut Exposition, peers: &[PeerStatus], now: SystemTime) {
    gauge(
        e,
        "wgslirpy_peers",
        "WireGuard peers configured.",
        peers.len(),
    );
    let keys: Vec<String> = peers.iter().map(|p| p.public_key.to_base64()).collect();
    e.family(
        "wgslirpy_peer_bytes_total",
        Kind::Counter,
        "Bytes received from (rx) and sent to (tx) each peer, WireGuard overhead included.",
    );
    for (peer, key) in peers.iter().zip(&keys) {
        e.sample(
            "wgslirpy_peer_bytes_total",
            &[("peer", key), ("direction", "rx")],
            peer.rx_bytes,
        );
        e.sample(
            "wgslirpy_peer_bytes_total",
            &[("peer", key), ("direction", "tx")],
            peer.tx_bytes,
        );
    }
    e.family(
        "wgslirpy_peer_handshakes_total",
        Kind::Counter,
        "Handshakes completed with each peer.",
    );
    for (peer, key) in peers.iter().zip(&keys) {
        e.sample(
            "wgslirpy_peer_handshakes_total",
            &[("peer", key)],
            peer.handshakes,
        );
    }
    e.family(
        "wgslirpy_peer_last_handshake_timestamp_seconds",
        Kind::Gauge,
        "Unix time of each peer's last completed handshake (absent before the first).",
    );
    for (peer, key) in peers.iter().zip(&keys) {
        let Some(since) = peer.since_last_handshake else {
            continue;
        };
        let at = now
            .checked_sub(since)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        e.sample(
            "wgslirpy_peer_last_handshake_timestamp_seconds",
            &[("peer", key)],
            Float(at),
        );
    }
}

/// A metric type, as `# TYPE` names it.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A float written with millisecond precision.
struct Float(f64);

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}", self.0)
    }
}

fn counter(e: &mut Exposition, name: &str, help: &str, value: u64) {
    e.family(name, Kind::Counter, help);
    e.sample(name, &[], value);
}

fn gauge(e: &mut Exposition, name: &str, help: &str, value: usize) {
    e.family(name, Kind::Gauge, help);
    e.sample(name, &[], value);
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"");
                for c in text.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(test)]
mod tests;
