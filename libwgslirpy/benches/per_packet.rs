//! Micro-benchmarks of the router core's per-packet path, on pre-built packets (issue 8).
//!
//! `cargo bench -p libwgslirpy --bench per_packet`. No crypto and no sockets: WireGuard's
//! costs are gotatun's (about 1 µs per 1420-byte packet each way, see docs/DESIGN.md), and the
//! driver's are syscalls. What is measured is parse → flow lookup → socket action for a
//! packet from the peer, and flow lookup → packet build for a datagram from the host,
//! each including the draining that the driver does after every input.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use libwgslirpy::Config;
use libwgslirpy::config::Transport;
use libwgslirpy::core::packet::{self, Parsed, TcpSegment};
use libwgslirpy::core::{FlowId, Router, SocketAction};

const PEER: &str = "10.0.2.15:40000";
const REMOTE: &str = "198.18.2.2:5201";
/// UDP payload: a 1420-byte IPv4 packet.
const UDP_PAYLOAD: usize = 1420 - 28;
/// TCP payload: the MSS for a 1420-byte MTU over IPv4.
const TCP_PAYLOAD: usize = 1420 - 40;

fn router() -> Router {
    let config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    Router::with_secret(&config, [7; 16])
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Drains what the driver would after an input; returns the number of outputs.
fn drain(router: &mut Router) -> usize {
    let mut n = 0;
    while let Some(action) = router.poll_socket_action() {
        black_box(action);
        n += 1;
    }
    while let Some(packet) = router.poll_transmit() {
        black_box(packet);
        n += 1;
    }
    n
}

/// A router with one UDP flow from the peer to the remote; returns the flow.
fn udp_router(packet: &[u8], now: Instant) -> (Router, FlowId) {
    let mut router = router();
    router.handle_packet(now, packet);
    let mut flow = None;
    while let Some(action) = router.poll_socket_action() {
        if let SocketAction::UdpOpen { flow: f, .. } = action {
            flow = Some(f);
        }
    }
    (router, flow.expect("the first datagram opens a flow"))
}

fn udp(c: &mut Criterion) {
    let payload = vec![0x5a; UDP_PAYLOAD];
    let packet = packet::build_udp(sa(PEER), sa(REMOTE), &payload).unwrap();
    let mut group = c.benchmark_group("udp");
    group.throughput(Throughput::Bytes(UDP_PAYLOAD as u64));

    let now = Instant::now();
    let (mut router, _) = udp_router(&packet, now);
    group.bench_function("handle_packet, existing flow (peer to host)", |b| {
        b.iter(|| {
            router.handle_packet(now, black_box(&packet));
            drain(&mut router)
        })
    });

    let (mut router, flow) = udp_router(&packet, now);
    group.bench_function("handle_udp_datagram (host to peer)", |b| {
        b.iter(|| {
            router.handle_udp_datagram(now, flow, sa(REMOTE), black_box(&payload));
            drain(&mut router)
        })
    });
    group.finish();
}

/// A peer with one established TCP connection, whose host socket takes every write at once.
struct TcpPeer {
    router: Router,
    now: Instant,
    flow: FlowId,
    /// The peer's next sequence number.
    seq: u32,
    /// What the peer acknowledges.
    ack: u32,
}

impl TcpPeer {
    fn establish() -> Self {
        let mut router = router();
        let now = Instant::now();
        let syn = TcpSegment {
            seq: 1000,
            syn: true,
            window: 64240,
            wscale: Some(7),
            mss: Some(1460),
            ..TcpSegment::default()
        };
        router.handle_packet(now, &packet::build_tcp(sa(PEER), sa(REMOTE), &syn).unwrap());
        let Some(SocketAction::TcpConnect { flow, .. }) = router.poll_socket_action() else {
            panic!("no connect");
        };
        router.handle_tcp_connected(now, flow);
        let syn_ack = router.poll_transmit().expect("SYN-ACK");
        let Ok(Parsed::Tcp { segment, .. }) = packet::parse(&syn_ack) else {
            panic!("not TCP");
        };
        let mut peer = TcpPeer {
            router,
            now,
            flow,
            seq: 1001,
            ack: segment.seq.wrapping_add(1),
        };
        let ack = peer.segment(&[]);
        peer.router.handle_packet(now, &ack);
        drain(&mut peer.router);
        peer
    }

    /// The peer's next segment carrying `payload` (advances its sequence number).
    fn segment(&mut self, payload: &[u8]) -> BytesMut {
        let segment = TcpSegment {
            seq: self.seq,
            ack: Some(self.ack),
            window: 512,
            payload,
            ..TcpSegment::default()
        };
        self.seq = self.seq.wrapping_add(payload.len() as u32);
        packet::build_tcp(sa(PEER), sa(REMOTE), &segment).unwrap()
    }

    /// Handles one segment, its payload copied for the host socket, which takes every
    /// write at once.
    fn handle(&mut self, packet: &[u8]) {
        self.now += Duration::from_micros(1);
        self.router.handle_packet(self.now, packet);
        self.settle();
    }

    /// Handles one segment as the driver does, handed over: its payload is a view.
    fn handle_owned(&mut self, packet: Bytes) {
        self.now += Duration::from_micros(1);
        self.router.handle_owned_packet(self.now, packet);
        self.settle();
    }

    /// Writes every write at once, and takes what goes to the peer.
    fn settle(&mut self) {
        while let Some(action) = self.router.poll_socket_action() {
            if let SocketAction::TcpWrite { data, .. } = action {
                self.router
                    .handle_tcp_written(self.now, self.flow, data.len());
            }
        }
        while let Some(packet) = self.router.poll_transmit() {
            black_box(packet);
        }
    }
}

fn tcp(c: &mut Criterion) {
    let payload = vec![0x5a; TCP_PAYLOAD];
    let mut group = c.benchmark_group("tcp");
    group.throughput(Throughput::Bytes(TCP_PAYLOAD as u64));
    let mut peer = TcpPeer::establish();
    group.bench_function("handle_packet, data on an established connection", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Build a batch of in-order segments first; only handling them is timed.
                let batch: Vec<BytesMut> = (0..left.min(1024))
                    .map(|_| peer.segment(&payload))
                    .collect();
                let start = Instant::now();
                for packet in &batch {
                    peer.handle(packet);
                }
                total += start.elapsed();
                left -= batch.len() as u64;
            }
            total
        })
    });
    group.bench_function(
        "handle_owned_packet, data on an established connection",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let count = left.min(1024);
                    let batch: Vec<Bytes> = (0..count)
                        .map(|_| peer.segment(&payload).freeze())
                        .collect();
                    let start = Instant::now();
                    for packet in batch {
                        peer.handle_owned(packet);
                    }
                    total += start.elapsed();
                    left -= count;
                }
                total
            })
        },
    );
    group.finish();
}

criterion_group!(benches, udp, tcp);
criterion_main!(benches);
