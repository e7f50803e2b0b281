//! Router tests: packets in, packets and actions out, on a virtual clock.

use std::time::Duration;

use super::*;
use crate::config::Transport;

fn config() -> Config {
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    config.pingable = vec!["10.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    config
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn actions(router: &mut Router) -> Vec<SocketAction> {
    std::iter::from_fn(|| router.poll_socket_action()).collect()
}

fn transmitted(router: &mut Router) -> Vec<BytesMut> {
    std::iter::from_fn(|| router.poll_transmit()).collect()
}

fn echo_request(src: &str, dst: &str, data: &[u8]) -> BytesMut {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr};
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    // Build a reply with the roles swapped, then turn it into a request.
    let mut packet = packet::build_echo_reply(src, dst, 0x1234, 7, data).unwrap();
    let header = if src.is_ipv4() { 20 } else { 40 };
    let icmp = &mut packet[header..];
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            let repr = Icmpv4Repr::EchoRequest {
                ident: 0x1234,
                seq_no: 7,
                data,
            };
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(icmp),
                &ChecksumCapabilities::default(),
            );
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let repr = Icmpv6Repr::EchoRequest {
                ident: 0x1234,
                seq_no: 7,
                data,
            };
            repr.emit(
                &s,
                &d,
                &mut Icmpv6Packet::new_unchecked(icmp),
                &ChecksumCapabilities::default(),
            );
        }
        _ => unreachable!(),
    }
    packet
}

#[test]
fn pingable_answers_echo_v4_and_v6() {
    for (peer, local) in [("10.0.2.15", "10.0.2.1"), ("fd00::2", "fd00::1")] {
        let mut router = Router::new(&config());
        let now = Instant::now();
        router.handle_packet(now, &echo_request(peer, local, b"payload"));
        let out = transmitted(&mut router);
        assert_eq!(out.len(), 1);
        let expected = packet::build_echo_reply(
            local.parse().unwrap(),
            peer.parse().unwrap(),
            0x1234,
            7,
            b"payload",
        )
        .unwrap();
        assert_eq!(out[0], expected);
        assert_eq!(router.stats().echo_replies, 1);
        assert!(actions(&mut router).is_empty());
    }
}

#[test]
fn echo_to_other_address_is_forwarded_and_the_reply_returns() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    router.handle_packet(now, &echo_request("10.0.2.15", "198.18.0.1", b"abc"));
    assert!(transmitted(&mut router).is_empty());
    let acts = actions(&mut router);
    let SocketAction::IcmpOpen { flow, ipv6: false } = acts[0] else {
        panic!("expected an ICMP open: {acts:?}");
    };
    assert_eq!(
        acts[1..],
        [SocketAction::IcmpSend {
            flow,
            dest: "198.18.0.1".parse().unwrap(),
            seq_no: 7,
            data: Bytes::from_static(b"abc"),
        }]
    );
    // The reply gets the peer's own identifier back.
    router.handle_echo_reply(now, flow, "198.18.0.1".parse().unwrap(), 7, b"abc");
    let expected = packet::build_echo_reply(
        "198.18.0.1".parse().unwrap(),
        "10.0.2.15".parse().unwrap(),
        0x1234,
        7,
        b"abc",
    )
    .unwrap();
    assert_eq!(transmitted(&mut router), vec![expected]);
    assert_eq!(router.stats().echo_replies_forwarded, 1);
}

#[test]
fn echo_identities_share_a_socket_and_expire() {
    let config = config();
    let idle = config.icmp_idle_timeout;
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    router.handle_packet(t0, &echo_request("fd00::2", "fd01::1", b"1"));
    router.handle_packet(t0, &echo_request("fd00::2", "fd01::9", b"2"));
    let acts = actions(&mut router);
    let opens: Vec<_> = acts
        .iter()
        .filter(|a| matches!(a, SocketAction::IcmpOpen { ipv6: true, .. }))
        .collect();
    assert_eq!(opens.len(), 1, "{acts:?}");
    let SocketAction::IcmpOpen { flow, .. } = *opens[0] else {
        unreachable!()
    };
    assert_eq!(router.poll_timeout(), Some(t0 + idle));
    router.handle_timeout(t0 + idle);
    assert_eq!(actions(&mut router), vec![SocketAction::IcmpClose { flow }]);
    // A late reply goes nowhere.
    router.handle_echo_reply(t0 + idle, flow, "fd01::1".parse().unwrap(), 7, b"1");
    assert!(transmitted(&mut router).is_empty());
}

#[test]
fn udp_flow_opens_once_and_replies_reach_the_peer() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    for dst in [sa("198.18.0.1:7"), sa("198.18.0.2:9")] {
        router.handle_packet(now, &packet::build_udp(peer, dst, b"hi").unwrap());
    }
    let acts = actions(&mut router);
    let SocketAction::UdpOpen { flow, ipv6: false } = acts[0] else {
        panic!("expected an open first: {acts:?}");
    };
    assert_eq!(
        acts[1..],
        [
            SocketAction::UdpSend {
                flow,
                dest: sa("198.18.0.1:7"),
                payload: Bytes::from_static(b"hi"),
            },
            SocketAction::UdpSend {
                flow,
                dest: sa("198.18.0.2:9"),
                payload: Bytes::from_static(b"hi"),
            },
        ]
    );

    // Endpoint-independent: a third party's datagram reaches the peer too.
    router.handle_udp_datagram(now, flow, sa("198.18.0.3:1234"), b"reply");
    assert_eq!(
        transmitted(&mut router),
        vec![packet::build_udp(sa("198.18.0.3:1234"), peer, b"reply").unwrap()]
    );
}

#[test]
fn udp_reply_from_v4_mapped_address_is_delivered_as_v4() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    router.handle_packet(
        now,
        &packet::build_udp(peer, sa("198.18.0.1:7"), b"q").unwrap(),
    );
    let Some(SocketAction::UdpOpen { flow, .. }) = router.poll_socket_action() else {
        panic!("no open");
    };
    router.handle_udp_datagram(now, flow, sa("[::ffff:198.18.0.1]:7"), b"a");
    assert_eq!(
        transmitted(&mut router),
        vec![packet::build_udp(sa("198.18.0.1:7"), peer, b"a").unwrap()]
    );
}

#[test]
fn udp_flow_expires_after_idle_timeout_and_traffic_refreshes_it() {
    let config = config();
    let idle = config.udp_idle_timeout;
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    let peer = sa("[fd00::2]:5000");
    router.handle_packet(
        t0,
        &packet::build_udp(peer, sa("[fd01::1]:7"), b"q").unwrap(),
    );
    let Some(SocketAction::UdpOpen { flow, ipv6: true }) = router.poll_socket_action() else {
        panic!("no v6 open");
    };
    actions(&mut router);
    assert_eq!(router.poll_timeout(), Some(t0 + idle));

    // A reply halfway refreshes the flow.
    let half = t0 + idle / 2;
    router.handle_udp_datagram(half, flow, sa("[fd01::1]:7"), b"a");
    assert_eq!(transmitted(&mut router).len(), 1);
    router.handle_timeout(t0 + idle);
    assert!(actions(&mut router).is_empty());
    assert_eq!(router.poll_timeout(), Some(half + idle));

    router.handle_timeout(half + idle);
    assert_eq!(actions(&mut router), vec![SocketAction::UdpClose { flow }]);
    assert_eq!(router.stats().udp_flows_expired, 1);
    assert_eq!(router.poll_timeout(), None);

    // A late datagram for the closed flow goes nowhere.
    router.handle_udp_datagram(half + idle, flow, sa("[fd01::1]:7"), b"late");
    assert!(transmitted(&mut router).is_empty());
}

#[test]
fn full_udp_table_evicts_least_recently_used_flow() {
    let mut config = config();
    config.max_udp_flows = 2;
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    let mut opened = Vec::new();
    for (i, port) in [5000u16, 5001, 5002].into_iter().enumerate() {
        let src = SocketAddr::new("10.0.2.15".parse().unwrap(), port);
        let now = t0 + Duration::from_secs(i as u64);
        router.handle_packet(
            now,
            &packet::build_udp(src, sa("198.18.0.1:7"), b"x").unwrap(),
        );
        opened.extend(actions(&mut router));
    }
    let first_flow = match opened[0] {
        SocketAction::UdpOpen { flow, .. } => flow,
        _ => panic!("{opened:?}"),
    };
    assert!(opened.contains(&SocketAction::UdpClose { flow: first_flow }));
    assert_eq!(router.stats().udp_flows_evicted, 1);
}

#[test]
fn failed_udp_socket_removes_the_flow() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    router.handle_packet(
        now,
        &packet::build_udp(peer, sa("198.18.0.1:7"), b"q").unwrap(),
    );
    let Some(SocketAction::UdpOpen { flow, .. }) = router.poll_socket_action() else {
        panic!("no open");
    };
    actions(&mut router);
    router.handle_udp_failed(now, flow);
    assert_eq!(router.poll_timeout(), None);
    router.handle_packet(
        now,
        &packet::build_udp(peer, sa("198.18.0.1:7"), b"q").unwrap(),
    );
    assert!(matches!(
        router.poll_socket_action(),
        Some(SocketAction::UdpOpen { flow: f, .. }) if f != flow
    ));
}

#[test]
fn udp_reply_over_the_mtu_is_fragmented_and_the_peers_fragments_reassembled() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    let server = sa("198.18.0.1:7");
    router.handle_packet(now, &packet::build_udp(peer, server, b"q").unwrap());
    let Some(SocketAction::UdpOpen { flow, .. }) = router.poll_socket_action() else {
        panic!("no open");
    };
    actions(&mut router);
    let big: Vec<u8> = (0..20_000).map(|i| i as u8).collect();
    router.handle_udp_datagram(now, flow, server, &big);
    let pieces = transmitted(&mut router);
    assert_eq!(pieces.len(), 15);
    assert!(pieces.iter().all(|p| p.len() <= 1420));
    assert_eq!(router.stats().packets_fragmented, 1);

    // The peer's own fragments come back together into one datagram.
    let whole = packet::build_udp(peer, server, &big).unwrap();
    let mut from_peer = Vec::new();
    fragment::fragment(&whole, 1280, 99, |piece| from_peer.push(piece));
    for piece in &from_peer {
        router.handle_packet(now, piece);
    }
    assert_eq!(router.stats().datagrams_reassembled, 1);
    assert_eq!(
        actions(&mut router),
        vec![SocketAction::UdpSend {
            flow,
            dest: server,
            payload: Bytes::from(big),
        }]
    );
}

#[test]
fn a_datagram_reassembled_in_another_shard_goes_to_its_own_and_is_counted_once() {
    let shards = shard::Shards::new(2);
    let peer = sa("10.0.2.15:5000");
    let server = sa("198.18.0.1:7");
    let owner = shards.of_endpoint(peer);
    let whole = packet::build_udp(peer, server, &[7; 3000]).unwrap();
    let mut pieces = Vec::new();
    fragment::fragment(&whole, 1280, 99, |piece| pieces.push(piece));
    let fragment_bytes: usize = pieces.iter().map(|p| p.len()).sum();
    let now = Instant::now();

    // Fragments go by their IP identification, so they may land on the
    // shard that does not own the datagram: it hands the datagram on.
    let mut other = Router::new(&config()).in_shard(1 - owner, shards);
    for piece in &pieces {
        other.handle_packet(now, piece);
    }
    assert_eq!(actions(&mut other), vec![]);
    assert_eq!(other.reroute_target(), Some(owner));
    let (to, rerouted) = other.poll_reroute().expect("handed on");
    assert_eq!(to, owner);
    // The same datagram (its IP header is rebuilt by the reassembler).
    assert!(rerouted[20..] == whole[20..], "not the datagram");
    assert_eq!(other.poll_reroute(), None);

    let mut own = Router::new(&config()).in_shard(owner, shards);
    own.handle_owned_packet(now, rerouted.freeze());
    assert!(matches!(
        actions(&mut own)[..],
        [SocketAction::UdpOpen { .. }, SocketAction::UdpSend { .. }]
    ));
    // Over both shards, every fragment counted once, as one router would.
    let mut total = other.stats().clone();
    total.add(own.stats());
    assert_eq!(total.packets_in, pieces.len() as u64);
    let bytes: u64 = [&other, &own]
        .iter()
        .map(|r| r.peer_stats()[0].counters.bytes_from)
        .sum();
    assert_eq!(bytes, fragment_bytes as u64);

    // The owner keeps what it reassembles.
    let mut own = Router::new(&config()).in_shard(owner, shards);
    for piece in &pieces {
        own.handle_packet(now, piece);
    }
    assert_eq!(own.poll_reroute(), None);
    assert_eq!(actions(&mut own).len(), 2);
}

#[test]
fn denied_destinations_get_admin_prohibited_and_open_nothing() {
    let mut router = Router::new(&config());
    router.set_host_addresses(&["198.18.1.1".parse().unwrap()]);
    let now = Instant::now();
    let denied = [
        packet::build_udp(sa("10.0.2.15:5000"), sa("127.0.0.1:22"), b"x").unwrap(),
        packet::build_udp(sa("10.0.2.15:5000"), sa("198.18.1.1:53"), b"x").unwrap(),
        packet::build_udp(sa("[fd00::2]:5000"), sa("[fe80::1]:53"), b"x").unwrap(),
        echo_request("10.0.2.15", "169.254.169.254", b"x"),
    ];
    for packet in &denied {
        router.handle_packet(now, packet);
        let errors = transmitted(&mut router);
        assert_eq!(errors.len(), 1);
        let expected =
            packet::build_icmp_error(packet, packet::IcmpError::AdminProhibited).unwrap();
        assert_eq!(errors[0], expected);
    }
    assert!(actions(&mut router).is_empty());
    assert_eq!(router.stats().dropped_policy, 4);
}

#[test]
fn host_address_reaches_the_hosts_loopback() {
    let mut config = config();
    config.host_address = Some("10.0.2.2".parse().unwrap());
    let mut router = Router::new(&config);
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    router.handle_packet(
        now,
        &packet::build_udp(peer, sa("10.0.2.2:8080"), b"q").unwrap(),
    );
    let acts = actions(&mut router);
    let SocketAction::UdpOpen { flow, .. } = acts[0] else {
        panic!("{acts:?}");
    };
    assert!(matches!(
        &acts[1],
        SocketAction::UdpSend { dest, .. } if *dest == sa("127.0.0.1:8080")
    ));
    router.handle_udp_datagram(now, flow, sa("127.0.0.1:8080"), b"a");
    assert_eq!(
        transmitted(&mut router),
        vec![packet::build_udp(sa("10.0.2.2:8080"), peer, b"a").unwrap()]
    );
}

#[test]
fn transmit_queue_is_bounded() {
    let mut config = config();
    config.transmit_queue_capacity = 3;
    let mut router = Router::new(&config);
    let now = Instant::now();
    for _ in 0..5 {
        router.handle_packet(now, &echo_request("10.0.2.15", "10.0.2.1", b"x"));
    }
    assert_eq!(transmitted(&mut router).len(), 3);
    assert_eq!(router.stats().dropped_queue_full, 2);
}

#[test]
fn garbage_is_counted_not_fatal() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    for junk in [&[][..], &[0x45][..], &[0x60; 39][..], &[0xff; 100][..]] {
        router.handle_packet(now, junk);
    }
    assert_eq!(router.stats().dropped_malformed, 4);
    // And the router still works.
    router.handle_packet(now, &echo_request("10.0.2.15", "10.0.2.1", b"x"));
    assert_eq!(transmitted(&mut router).len(), 1);
}

#[test]
fn udp_port_unreachable_reaches_the_peer_as_icmp() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let peer = sa("[fd00::2]:5000");
    let server = sa("[fd01::1]:9");
    router.handle_packet(now, &packet::build_udp(peer, server, b"q").unwrap());
    let Some(SocketAction::UdpOpen { flow, .. }) = router.poll_socket_action() else {
        panic!("no open");
    };
    router.handle_udp_unreachable(now, flow, server, packet::IcmpError::PortUnreachable);
    let original = packet::build_udp(peer, server, b"").unwrap();
    let expected = packet::build_icmp_error(&original, packet::IcmpError::PortUnreachable).unwrap();
    assert_eq!(transmitted(&mut router), vec![expected]);
    assert_eq!(router.stats().udp_errors_relayed, 1);
}
