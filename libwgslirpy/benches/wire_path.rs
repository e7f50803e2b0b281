//! The whole per-packet path of one WireGuard data packet, on pre-built packets (issue 8):
//! socket read → decrypt → parse → flow lookup → socket write, from the peer to the
//! network, and socket read → flow lookup → packet build → encrypt → socket write, back.
//!
//! `cargo bench -p libwgslirpy --bench wire_path`. Crypto is gotatun's (ring), as in the
//! gateway; the sockets are UDP sockets on the loopback, one datagram per call. Left out is
//! what the driver adds around this path: wake-ups, batching (recvmmsg, GSO) and the
//! channel between gotatun's device task and the router task. Each iteration's input (the
//! peer's encrypted packet, the host's datagram) is sent in untimed setup.
//! `seal_router_packet_1420` times encryption alone, of a packet as the router builds it.

use std::hint::black_box;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::{PublicKey, StaticSecret};
use libwgslirpy::Config;
use libwgslirpy::config::Transport;
use libwgslirpy::core::{FlowId, Router, SocketAction, packet};

const PEER: &str = "10.0.2.15:40000";
const REMOTE: &str = "198.18.2.2:5201";
const MTU: u16 = 1420;
/// UDP payload of a 1420-byte IPv4 packet.
const PAYLOAD: usize = MTU as usize - 28;

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Two ends of a WireGuard session, handshaken in memory: the gateway's and the peer's.
fn session() -> (Tunn, Tunn) {
    let end = |own: u8, other: u8| {
        let secret = StaticSecret::from([own; 32]);
        let public = PublicKey::from(&secret);
        let other_public = PublicKey::from(&StaticSecret::from([other; 32]));
        let limiter = Arc::new(RateLimiter::new(&public, 100));
        Tunn::new(
            secret,
            other_public,
            None,
            None,
            IndexTable::from_os_rng(),
            limiter,
        )
    };
    let (mut gateway, mut peer) = (end(1, 2), end(2, 1));
    let init = peer.format_handshake_initiation(false).expect("initiation");
    let TunnResult::WriteToNetwork(response) =
        gateway.handle_incoming_packet(WgKind::HandshakeInit(init))
    else {
        panic!("no handshake response");
    };
    let TunnResult::WriteToNetwork(keepalive) = peer.handle_incoming_packet(response) else {
        panic!("no keepalive after the handshake");
    };
    let TunnResult::WriteToTunnel(_) = gateway.handle_incoming_packet(keepalive) else {
        panic!("keepalive not accepted");
    };
    (gateway, peer)
}

/// A UDP socket on the loopback.
fn loopback() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}

/// Receives and drops whatever waits on `socket`.
fn drain(socket: &UdpSocket, buf: &mut [u8]) {
    while socket.recv_from(buf).is_ok() {}
}

/// Encrypts `ip` as the peer and returns the datagram it sends.
fn seal(peer: &mut Tunn, ip: &[u8]) -> Packet {
    let sealed = peer
        .handle_outgoing_packet(Packet::from_bytes(BytesMut::from(ip)), None)
        .expect("a session");
    Packet::from(sealed)
}

/// Everything both directions need: the session, the router with one UDP flow, and the
/// sockets (the gateway's tunnel socket and the flow's host socket, with their far ends).
struct Path {
    gateway: Tunn,
    peer: Tunn,
    router: Router,
    flow: FlowId,
    mtu: MtuWatcher,
    /// The gateway's tunnel socket, and the peer's.
    tunnel: UdpSocket,
    peer_socket: UdpSocket,
    /// The flow's host socket, and the remote host it talks to.
    host: UdpSocket,
    remote: UdpSocket,
    buf: Vec<u8>,
}

impl Path {
    fn new() -> Self {
        let (gateway, peer) = session();
        let config = Config::new(
            Transport::RawIp {
                peer_endpoint: None,
            },
            "127.0.0.1:0".parse().unwrap(),
        );
        let mut router = Router::with_secret(&config, [7; 16]);
        let first = packet::build_udp(sa(PEER), sa(REMOTE), &[0; PAYLOAD]).unwrap();
        router.handle_packet(Instant::now(), &first);
        let mut flow = None;
        while let Some(action) = router.poll_socket_action() {
            if let SocketAction::UdpOpen { flow: id, .. } = action {
                flow = Some(id);
            }
        }
        Path {
            gateway,
            peer,
            router,
            flow: flow.expect("the first datagram opens a flow"),
            mtu: MtuWatcher::new(MTU),
            tunnel: loopback(),
            peer_socket: loopback(),
            host: loopback(),
            remote: loopback(),
            buf: vec![0; 65536],
        }
    }

    /// Untimed: the peer sends one encrypted datagram to the tunnel socket.
    fn peer_sends(&mut self, ip: &[u8]) {
        drain(&self.remote, &mut self.buf);
        let sealed = seal(&mut self.peer, ip);
        let to = self.tunnel.local_addr().unwrap();
        self.peer_socket.send_to(&sealed, to).unwrap();
    }

    /// Timed: tunnel socket → decrypt → router → host socket.
    fn forward_to_network(&mut self) -> usize {
        let (n, _) = self.tunnel.recv_from(&mut self.buf).unwrap();
        let datagram = Packet::from_bytes(BytesMut::from(&self.buf[..n]));
        let kind = datagram.try_into_wg().expect("a WireGuard message");
        let TunnResult::WriteToTunnel(ip) = self.gateway.handle_incoming_packet(kind) else {
            panic!("not decrypted");
        };
        self.router.handle_packet(Instant::now(), &ip);
        let remote = self.remote.local_addr().unwrap();
        let mut sent = 0;
        while let Some(action) = self.router.poll_socket_action() {
            if let SocketAction::UdpSend { payload, .. } = action {
                sent += self.host.send_to(&payload, remote).unwrap();
            }
        }
        sent
    }

    /// Untimed: the remote host sends one datagram to the flow's host socket.
    fn remote_sends(&mut self, payload: &[u8]) {
        drain(&self.peer_socket, &mut self.buf);
        let to = self.host.local_addr().unwrap();
        self.remote.send_to(payload, to).unwrap();
    }

    /// Timed: host socket → router → encrypt → tunnel socket.
    fn forward_to_peer(&mut self) -> usize {
        let (n, _) = self.host.recv_from(&mut self.buf).unwrap();
        self.router
            .handle_udp_datagram(Instant::now(), self.flow, sa(REMOTE), &self.buf[..n]);
        let peer = self.peer_socket.local_addr().unwrap();
        let mut sent = 0;
        while let Some(ip) = self.router.poll_transmit() {
            let ip = Packet::from_bytes(ip).try_into_ip().expect("an IP packet");
            let sealed = self
                .gateway
                .handle_outgoing_packet(ip.into(), Some(&mut self.mtu))
                .expect("a session");
            sent += self.tunnel.send_to(&Packet::from(sealed), peer).unwrap();
        }
        sent
    }
}

fn wire_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire_path");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    // Setup and routine both need it, one after the other.
    let path = std::cell::RefCell::new(Path::new());
    let ip = packet::build_udp(sa(PEER), sa(REMOTE), &[0x55; PAYLOAD]).unwrap();
    group.bench_function("peer_to_network_udp_1420", |b| {
        b.iter_batched(
            || path.borrow_mut().peer_sends(&ip),
            |()| black_box(path.borrow_mut().forward_to_network()),
            BatchSize::PerIteration,
        )
    });
    let payload = vec![0xaa; PAYLOAD];
    group.bench_function("network_to_peer_udp_1420", |b| {
        b.iter_batched(
            || path.borrow_mut().remote_sends(&payload),
            |()| black_box(path.borrow_mut().forward_to_peer()),
            BatchSize::PerIteration,
        )
    });
    // Encryption alone, of a packet as the router builds it: padding, the WireGuard header
    // and tag, and what that costs in allocations and copies.
    let Path {
        ref mut gateway,
        ref mut mtu,
        ..
    } = *path.borrow_mut();
    let built = packet::build_udp(sa(REMOTE), sa(PEER), &payload).unwrap();
    group.bench_function("seal_router_packet_1420", |b| {
        b.iter_batched(
            || {
                let mut copy = BytesMut::with_capacity(built.capacity());
                copy.extend_from_slice(&built);
                Packet::from_bytes(copy)
                    .try_into_ip()
                    .expect("an IP packet")
            },
            |ip| {
                let sealed = gateway
                    .handle_outgoing_packet(ip.into(), Some(&mut *mtu))
                    .expect("a session");
                black_box(Packet::from(sealed).len())
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, wire_path);
criterion_main!(benches);
