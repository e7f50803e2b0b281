//! Hostile input into the router's entry point (issue 6), in the ordinary
//! test suite: random bytes and mutated valid packets never panic, and the
//! bounded tables stay within their limits whatever a peer sends. The
//! cargo-fuzz targets in `fuzz/` drive the same entry point for longer.

use std::time::Duration;

use proptest::prelude::*;

use super::packet::TcpSegment;
use super::*;
use crate::config::Transport;

/// Small limits, so that a few hundred packets reach every one of them.
fn config() -> Config {
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    config.pingable = vec!["10.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    config.dns = Some("10.0.2.1:53".parse().unwrap());
    config.max_udp_flows = 8;
    config.max_tcp_connections = 8;
    config.max_tcp_pending_connects = 4;
    config.max_icmp_ids = 4;
    config.max_dns_queries = 4;
    config.max_reassembly_bytes = 8192;
    config.transmit_queue_capacity = 16;
    config
}

fn assert_within_limits(router: &Router, config: &Config) {
    assert!(
        router.within_limits(config),
        "{:?} {:?}",
        router.occupancy(),
        router.peer_stats()
    );
}

/// Drains the router as the driver does; returns how many outputs it made.
fn drain(router: &mut Router) -> usize {
    let mut n = 0;
    while router.poll_socket_action().is_some() {
        n += 1;
    }
    while router.poll_transmit().is_some() {
        n += 1;
    }
    n
}

pub(super) fn dns_query(id: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
    m
}

pub(super) fn echo_request(src: IpAddr, dst: IpAddr, ident: u16) -> BytesMut {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr};
    let data = b"ping";
    let mut packet = packet::build_echo_reply(src, dst, ident, 1, data).unwrap();
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => Icmpv4Repr::EchoRequest {
            ident,
            seq_no: 1,
            data,
        }
        .emit(
            &mut Icmpv4Packet::new_unchecked(&mut packet[20..]),
            &ChecksumCapabilities::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => Icmpv6Repr::EchoRequest {
            ident,
            seq_no: 1,
            data,
        }
        .emit(
            &s,
            &d,
            &mut Icmpv6Packet::new_unchecked(&mut packet[40..]),
            &ChecksumCapabilities::default(),
        ),
        _ => unreachable!(),
    }
    packet
}

/// A valid packet of one of the kinds the router handles, from a peer
/// endpoint chosen by `n` (so that many `n` open many flows).
fn valid_packet(kind: u8, n: u16, v6: bool) -> Vec<u8> {
    let (peer, remote, gateway): (IpAddr, IpAddr, IpAddr) = if v6 {
        (
            "fd00::2".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
            "fd00::1".parse().unwrap(),
        )
    } else {
        (
            "10.0.2.15".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
            "10.0.2.1".parse().unwrap(),
        )
    };
    let port = 1024 + n % 64_000;
    let from = SocketAddr::new(peer, port);
    let to = SocketAddr::new(remote, 80);
    match kind % 8 {
        0 => packet::build_udp(from, to, b"hello").unwrap().to_vec(),
        1 => packet::build_tcp(
            from,
            to,
            &TcpSegment {
                seq: u32::from(n) * 7919,
                syn: true,
                window: 65535,
                mss: Some(1360),
                wscale: Some(7),
                ..TcpSegment::default()
            },
        )
        .unwrap()
        .to_vec(),
        2 => packet::build_tcp(
            from,
            to,
            &TcpSegment {
                seq: 1,
                ack: Some(2),
                window: 100,
                payload: b"data for no connection",
                ..TcpSegment::default()
            },
        )
        .unwrap()
        .to_vec(),
        3 => echo_request(peer, remote, n).to_vec(),
        4 => echo_request(peer, gateway, n).to_vec(),
        5 => packet::build_udp(from, SocketAddr::new(gateway, 53), &dns_query(n))
            .unwrap()
            .to_vec(),
        6 => {
            // The first fragment of a datagram too big for one packet.
            let big = packet::build_udp(from, to, &[0x5a; 3000]).unwrap();
            let mut first = None;
            fragment::fragment(&big, 1280, u32::from(n), |piece| {
                first.get_or_insert(piece);
            });
            first.unwrap().to_vec()
        }
        _ => packet::build_udp(from, SocketAddr::new(gateway, 53), &[])
            .unwrap()
            .to_vec(),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (position modulo the length).
    Flip(usize, u8),
    /// Keep only the first bytes.
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Set the IPv4 total length or IPv6 payload length.
    Length(u16),
    /// Set the IPv4 IHL / version nibble byte.
    FirstByte(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        prop_oneof![Just(0u16), Just(1), Just(20), Just(40), any::<u16>()]
            .prop_map(Mutation::Length),
        any::<u8>().prop_map(Mutation::FirstByte),
    ]
}

fn mutate(packet: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, x) if !packet.is_empty() => {
            let i = i % packet.len();
            packet[i] ^= x;
        }
        Mutation::Flip(..) => {}
        Mutation::Truncate(n) => packet.truncate(n % (packet.len() + 1)),
        Mutation::Extend(bytes) => packet.extend_from_slice(bytes),
        Mutation::Length(len) => {
            let at = if packet.first().is_some_and(|b| b >> 4 == 6) {
                4
            } else {
                2
            };
            if packet.len() >= at + 2 {
                packet[at..at + 2].copy_from_slice(&len.to_be_bytes());
            }
        }
        Mutation::FirstByte(b) => {
            if let Some(first) = packet.first_mut() {
                *first = *b;
            }
        }
    }
}

/// The packet that killed wgslirpy 0.2.0: IPv4 with a total length of 0.
#[test]
fn ipv4_total_length_zero_is_a_counted_drop() {
    let config = config();
    let mut router = Router::new(&config);
    let mut packet = valid_packet(0, 1, false);
    packet[2..4].copy_from_slice(&[0, 0]);
    router.handle_packet(Instant::now(), &packet);
    assert_eq!(router.stats().dropped_malformed, 1);
    assert_eq!(drain(&mut router), 0);
}

/// Every kind of valid packet is accepted (so that the mutations below start
/// from packets that reach deep into the router).
#[test]
fn templates_are_valid() {
    for kind in 0..8 {
        for v6 in [false, true] {
            let packet = valid_packet(kind, 1, v6);
            if kind == 6 {
                continue;
            }
            assert!(packet::parse(&packet).is_ok(), "kind {kind} v6 {v6}");
        }
    }
}

/// Tiny fragments, each of its own datagram: the reassembly limit holds.
#[test]
fn fragment_flood_stays_within_the_reassembly_limit() {
    let config = config();
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    for n in 0..5000u16 {
        let now = t0 + Duration::from_millis(u64::from(n));
        router.handle_packet(now, &valid_packet(6, n, n % 2 == 1));
        drain(&mut router);
        assert_within_limits(&router, &config);
    }
    assert!(router.stats().dropped_fragments == 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(packets in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..1600), 1..16)
    ) {
        let config = config();
        let mut router = Router::new(&config);
        let now = Instant::now();
        for packet in &packets {
            router.handle_packet(now, packet);
            drain(&mut router);
        }
        assert_within_limits(&router, &config);
        // Random bytes that happen to look like IP with a valid checksum are
        // vanishingly rare: nearly all are counted drops.
        prop_assert!(router.stats().packets_in == packets.len() as u64);
    }

    #[test]
    fn random_bytes_behind_an_ip_version_nibble_never_panic(
        v6 in any::<bool>(),
        rest in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let config = config();
        let mut router = Router::new(&config);
        let mut packet = vec![if v6 { 0x60 } else { 0x45 }];
        packet.extend(rest);
        router.handle_packet(Instant::now(), &packet);
        drain(&mut router);
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        kind in 0..8u8,
        v6 in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let config = config();
        let mut router = Router::new(&config);
        let mut packet = valid_packet(kind, 1, v6);
        for m in &mutations {
            mutate(&mut packet, m);
        }
        let now = Instant::now();
        router.handle_packet(now, &packet);
        drain(&mut router);
        router.handle_timeout(now + Duration::from_secs(3600));
        drain(&mut router);
        assert_within_limits(&router, &config);
    }

    /// A peer opening new flows of every kind as fast as it can, some
    /// packets mangled, time passing in random steps: no table ever exceeds
    /// its limit, and each input makes a bounded amount of output.
    #[test]
    fn tables_stay_within_their_limits(
        steps in proptest::collection::vec(
            (0..8u8, any::<u16>(), any::<bool>(), proptest::option::of(mutation()), 0..3000u64),
            1..300,
        )
    ) {
        let config = config();
        let mut router = Router::new(&config);
        let mut now = Instant::now();
        for (kind, n, v6, m, advance_ms) in steps {
            let mut packet = valid_packet(kind, n, v6);
            if let Some(m) = m {
                mutate(&mut packet, &m);
            }
            router.handle_packet(now, &packet);
            // One packet opens at most one flow or connection: a few
            // actions and a few packets (fragments of one answer at most).
            prop_assert!(drain(&mut router) <= 64);
            assert_within_limits(&router, &config);
            now += Duration::from_millis(advance_ms);
            if router.poll_timeout().is_some_and(|at| at <= now) {
                router.handle_timeout(now);
                drain(&mut router);
            }
            assert_within_limits(&router, &config);
        }
    }
}
