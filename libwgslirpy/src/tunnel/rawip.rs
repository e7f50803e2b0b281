//! Raw IP over UDP (`-k INSECURE -K GUE`): no encryption, no authentication.
//!
//! Each UDP datagram carries one IPv4 or IPv6 packet. Two framings are
//! accepted on receive, as Linux GUE (Generic UDP Encapsulation,
//! draft-ietf-intarea-gue) defines them:
//! - **variant 1**: the bare IP packet. Its first nibble, the IP version, is
//!   4 or 6, which GUE reads as variant bits `01`. This is what Linux sends
//!   for GUE with direct IP encapsulation, what FOU sends, and what a
//!   `socat` TUN-to-UDP bridge sends.
//! - **version 0**: a 4-byte GUE header (2 bits version, 1 bit control flag,
//!   5 bits header length in 32-bit words beyond those 4 bytes, 8 bits
//!   protocol, 16 bits flags), optional fields, then the packet. Only data
//!   messages carrying IPv4 (protocol 4) or IPv6 (41) are accepted, and the
//!   header is stripped.
//!
//! Everything else is dropped and counted. We always send variant 1: bare IP,
//! which every such receiver accepts.
//!
//! With a configured peer endpoint, only datagrams from that address are
//! accepted and replies go there. Without one, replies go to whoever sent
//! the newest accepted datagram; until someone has, outgoing packets are
//! dropped.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{IpPacket, TunnelError, TunnelHandle};
use crate::config::Config;

/// Largest UDP payload we can receive.
const MAX_DATAGRAM: usize = 65535;

/// Length of the fixed part of a GUE version 0 header.
const GUE_HEADER_LEN: usize = 4;

/// Keeps the raw IP transport alive. Dropping it aborts both tasks, which
/// closes the socket.
pub(super) struct Running {
    /// The receive and send tasks.
    _tasks: JoinSet<()>,
    /// Drop counters, shared with the tasks.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by tests only"))]
    counters: Arc<Counters>,
}

/// Datagrams and packets dropped, by reason.
#[derive(Debug, Default)]
struct Counters {
    /// Datagrams that were neither bare IPv4/IPv6 nor a GUE v0 data message
    /// carrying one.
    malformed: AtomicU64,
    /// Datagrams from an address other than the configured peer endpoint.
    foreign_source: AtomicU64,
    /// Outgoing packets dropped because no peer has spoken yet.
    no_destination: AtomicU64,
}

/// Starts the raw IP transport on `config.bind`. With `peer`, only that
/// address is accepted and replied to.
pub(super) async fn start(
    config: &Config,
    peer: Option<SocketAddr>,
) -> Result<TunnelHandle, TunnelError> {
    let bind_error = |source| TunnelError::Bind {
        addr: config.bind,
        source,
    };
    let socket = bind(config.bind).map_err(bind_error)?;
    super::socket_buffers::request(&socket, config.tunnel_socket_buffer);
    let local_addr = socket.local_addr().map_err(bind_error)?;

    match peer {
        None => tracing::warn!(
            %local_addr,
            "raw IP mode is unauthenticated and unencrypted: anyone who can send UDP \
             to this port can use the gateway, and replies go to the newest sender"
        ),
        Some(peer) => tracing::warn!(
            %local_addr,
            %peer,
            "raw IP mode is unencrypted and unauthenticated: datagrams are filtered \
             by source address only, which can be spoofed"
        ),
    }

    let (to_shards, incoming) = super::ToShards::channels(config);
    let (outgoing, lanes) = super::lanes(config);

    let shared = Arc::new(Shared {
        socket,
        map_v4_to_v6: local_addr.is_ipv6(),
        peer: peer.map(canonical),
        newest_sender: Mutex::new(None),
        counters: Arc::default(),
    });
    let counters = Arc::clone(&shared.counters);

    let mut tasks = JoinSet::new();
    let weak_shards = to_shards.downgrade();
    tasks.spawn(receive(Arc::clone(&shared), to_shards));
    for lane in lanes {
        tasks.spawn(send(Arc::clone(&shared), lane));
    }

    Ok(TunnelHandle {
        incoming,
        to_shards: weak_shards,
        outgoing,
        local_addr,
        control: super::TunnelControl(super::ControlInner::RawIp),
        _running: super::Running::RawIp(Running {
            _tasks: tasks,
            counters,
        }),
    })
}

/// Binds a non-blocking UDP socket to `addr`. `[::]` also accepts IPv4, as
/// it does for the WireGuard transport.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let IpAddr::V6(ip) = addr.ip() {
        socket.set_only_v6(!ip.is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// State shared by the two tasks.
struct Shared {
    /// The transport's socket.
    socket: UdpSocket,
    /// Whether the socket is IPv6, so IPv4 destinations need mapping.
    map_v4_to_v6: bool,
    /// The configured peer endpoint, IPv4 written as IPv4.
    peer: Option<SocketAddr>,
    /// Source of the newest accepted datagram; replies go there when no peer
    /// endpoint is configured.
    newest_sender: Mutex<Option<SocketAddr>>,
    /// Drop counters.
    counters: Arc<Counters>,
}

impl Shared {
    /// Where outgoing packets go right now, if anywhere.
    fn destination(&self) -> Option<SocketAddr> {
        self.peer.or_else(|| {
            *self
                .newest_sender
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
    }
}

/// Receives datagrams, checks and unwraps them, and hands the IP packets to
/// the routers. Ends when a router drops its `incoming`.
async fn receive(shared: Arc<Shared>, incoming: super::ToShards) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, source) = match shared.socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                // Transient on UDP (e.g. an ICMP error reported late); pause
                // briefly so a persistent one cannot spin.
                tracing::debug!(%error, "raw IP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let source = canonical(source);
        if shared.peer.is_some_and(|peer| peer != source) {
            shared
                .counters
                .foreign_source
                .fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%source, len, "dropping datagram from a foreign source");
            continue;
        }
        let packet = match decapsulate(&buffer[..len]) {
            Ok(packet) => packet,
            Err(why) => {
                shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%source, len, why, "dropping datagram");
                continue;
            }
        };
        if shared.peer.is_none() {
            let mut newest = shared
                .newest_sender
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *newest != Some(source) {
                tracing::debug!(%source, "raw IP replies now go to this sender");
                *newest = Some(source);
            }
        }
        tracing::trace!(%source, len = packet.len(), "packet from peer");
        if incoming.send(BytesMut::from(packet)).await.is_err() {
            return;
        }
    }
}

/// Sends the router's packets, bare, to the current destination. Ends when
/// the router drops `outgoing`.
async fn send(shared: Arc<Shared>, mut outgoing: mpsc::Receiver<IpPacket>) {
    while let Some(packet) = outgoing.recv().await {
        let Some(destination) = shared.destination() else {
            shared
                .counters
                .no_destination
                .fetch_add(1, Ordering::Relaxed);
            tracing::trace!(
                len = packet.len(),
                "no peer has spoken yet; dropping packet"
            );
            continue;
        };
        let target = if shared.map_v4_to_v6 {
            to_v6(destination)
        } else {
            destination
        };
        if let Err(error) = shared.socket.send_to(&packet, target).await {
            tracing::debug!(%destination, %error, "raw IP send failed");
        }
    }
}

/// Finds the IP packet in a datagram: bare (GUE variant 1) or behind a GUE
/// version 0 data header. The error says why the datagram is dropped.
fn decapsulate(datagram: &[u8]) -> Result<&[u8], &'static str> {
    let Some(&first) = datagram.first() else {
        return Err("empty");
    };
    let packet = match first >> 6 {
        // Variant 1: the first nibble is the IP version.
        0b01 => datagram,
        0b00 => {
            if datagram.len() < GUE_HEADER_LEN {
                return Err("truncated GUE header");
            }
            if first & 0x20 != 0 {
                return Err("GUE control message");
            }
            let header_len = GUE_HEADER_LEN + 4 * usize::from(first & 0x1f);
            let Some(packet) = datagram.get(header_len..) else {
                return Err("truncated GUE optional fields");
            };
            let expected_version = match datagram[1] {
                4 => 4,
                41 => 6,
                _ => return Err("GUE payload is not IPv4 or IPv6"),
            };
            if packet.first().map(|b| b >> 4) != Some(expected_version) {
                return Err("GUE protocol does not match the IP version");
            }
            packet
        }
        _ => return Err("unknown GUE version"),
    };
    let min_len = match packet[0] >> 4 {
        4 => 20,
        6 => 40,
        _ => return Err("not IPv4 or IPv6"),
    };
    if packet.len() < min_len {
        return Err("shorter than an IP header");
    }
    Ok(packet)
}

/// An address with IPv4-mapped IPv6 written as IPv4, so that sources seen on
/// a dual-stack socket compare equal to configured IPv4 endpoints.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address usable as destination on an IPv6 socket.
fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Transport;

    const WAIT: Duration = Duration::from_secs(5);

    /// A minimal IPv4 header (no payload) with a distinguishing id.
    fn ipv4(id: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[3] = 20;
        p[5] = id;
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[192, 0, 2, 1]);
        p
    }

    /// A minimal IPv6 header (no payload) with a distinguishing flow label.
    fn ipv6(id: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[3] = id;
        p[6] = 59; // no next header
        p[7] = 64;
        p[8] = 0xfd;
        p[24] = 0xfd;
        p
    }

    async fn start_raw(peer: Option<SocketAddr>) -> TunnelHandle {
        let cfg = Config::new(
            Transport::RawIp {
                peer_endpoint: peer,
            },
            "127.0.0.1:0".parse().unwrap(),
        );
        super::super::start(&cfg).await.unwrap()
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    async fn next(handle: &mut TunnelHandle) -> BytesMut {
        tokio::time::timeout(WAIT, handle.incoming[0].recv())
            .await
            .expect("a packet")
            .expect("transport running")
    }

    async fn recv(socket: &UdpSocket) -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        let len = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a datagram")
            .unwrap();
        buf.truncate(len);
        buf
    }

    fn counters(handle: &TunnelHandle) -> &Counters {
        match &handle._running {
            super::super::Running::RawIp(running) => &running.counters,
            super::super::Running::WireGuard(_) => unreachable!("raw IP transport"),
        }
    }

    #[tokio::test]
    async fn bare_ip_packets_pass() {
        let mut handle = start_raw(None).await;
        let c = client().await;
        c.send_to(&ipv4(1), handle.local_addr).await.unwrap();
        assert_eq!(next(&mut handle).await, ipv4(1));
        c.send_to(&ipv6(2), handle.local_addr).await.unwrap();
        assert_eq!(next(&mut handle).await, ipv6(2));
    }

    #[tokio::test]
    async fn gue_v0_header_is_stripped() {
        let mut handle = start_raw(None).await;
        let c = client().await;
        // Data message, no optional fields, protocol 4.
        let mut datagram = vec![0x00, 4, 0, 0];
        datagram.extend(ipv4(3));
        c.send_to(&datagram, handle.local_addr).await.unwrap();
        assert_eq!(next(&mut handle).await, ipv4(3));
        // Data message with one word of optional fields, protocol 41.
        let mut datagram = vec![0x01, 41, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd];
        datagram.extend(ipv6(4));
        c.send_to(&datagram, handle.local_addr).await.unwrap();
        assert_eq!(next(&mut handle).await, ipv6(4));
    }

    #[tokio::test]
    async fn garbage_is_dropped_and_counted() {
        let mut handle = start_raw(None).await;
        let c = client().await;
        let mut control = vec![0x20, 4, 0, 0];
        control.extend(ipv4(9));
        let mut wrong_proto = vec![0x00, 41, 0, 0];
        wrong_proto.extend(ipv4(9));
        let mut short_options = vec![0x03, 4, 0, 0];
        short_options.extend([0; 4]);
        let garbage: [&[u8]; 8] = [
            b"",
            b"\x00\x04",
            &control,
            &wrong_proto,
            &short_options,
            b"\x50\x00\x00\x14 not a version",
            &[0xc0; 24],
            &ipv4(9)[..19],
        ];
        for datagram in garbage {
            c.send_to(datagram, handle.local_addr).await.unwrap();
        }
        c.send_to(&ipv4(5), handle.local_addr).await.unwrap();
        // Datagrams from one socket arrive in order: the valid one is first.
        assert_eq!(next(&mut handle).await, ipv4(5));
        assert_eq!(counters(&handle).malformed.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn peer_endpoint_filters_sources() {
        let peer = client().await;
        let stranger = client().await;
        let mut handle = start_raw(Some(peer.local_addr().unwrap())).await;

        stranger.send_to(&ipv4(6), handle.local_addr).await.unwrap();
        peer.send_to(&ipv4(7), handle.local_addr).await.unwrap();
        assert_eq!(next(&mut handle).await, ipv4(7));
        assert_eq!(counters(&handle).foreign_source.load(Ordering::Relaxed), 1);

        // Replies go to the configured peer even after the stranger spoke.
        handle.outgoing[0]
            .try_send(BytesMut::from(&ipv4(8)[..]))
            .unwrap();
        assert_eq!(recv(&peer).await, ipv4(8));
    }

    #[tokio::test]
    async fn replies_go_to_the_newest_sender() {
        let mut handle = start_raw(None).await;

        // Nobody has spoken: dropped.
        handle.outgoing[0]
            .try_send(BytesMut::from(&ipv4(1)[..]))
            .unwrap();
        tokio::time::timeout(WAIT, async {
            while counters(&handle).no_destination.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("packet dropped for want of a destination");

        let first = client().await;
        let second = client().await;
        first.send_to(&ipv4(2), handle.local_addr).await.unwrap();
        next(&mut handle).await;
        handle.outgoing[0]
            .try_send(BytesMut::from(&ipv4(3)[..]))
            .unwrap();
        assert_eq!(recv(&first).await, ipv4(3));

        second.send_to(&ipv6(4), handle.local_addr).await.unwrap();
        next(&mut handle).await;
        handle.outgoing[0]
            .try_send(BytesMut::from(&ipv6(5)[..]))
            .unwrap();
        assert_eq!(recv(&second).await, ipv6(5));
    }

    #[tokio::test]
    async fn port_in_use_is_a_bind_error() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let cfg = Config::new(
            Transport::RawIp {
                peer_endpoint: None,
            },
            addr,
        );
        match super::super::start(&cfg).await {
            Err(TunnelError::Bind {
                addr: reported,
                source,
            }) => {
                assert_eq!(reported, addr);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            Err(other) => panic!("expected a bind error, got {other}"),
            Ok(_) => panic!("expected a bind error, but the port was bound twice"),
        }
    }

    #[test]
    fn decapsulate_edge_cases() {
        // Variant 1 with a first nibble other than 4 or 6.
        assert!(decapsulate(&[0x70; 40]).is_err());
        // GUE version 1 and the reserved version bits.
        assert!(decapsulate(&[0x80; 40]).is_err());
        // Largest header length, nothing behind it.
        let mut long = vec![0x1f, 4, 0, 0];
        long.extend([0; 120]);
        assert_eq!(decapsulate(&long), Err("truncated GUE optional fields"));
        long.extend([0; 4]);
        assert!(decapsulate(&long).is_err());
        long.extend(ipv4(1));
        assert_eq!(decapsulate(&long), Ok(&ipv4(1)[..]));
    }
}
