//! Per-peer attribution and limits: two peers with overlapping allowed IPs,
//! one of them flooding, on a virtual clock with no sockets.

use std::collections::HashSet;
use std::time::Duration;

use super::hostile_tests::{dns_query, echo_request};
use super::packet::TcpSegment;
use super::*;
use crate::config::{Key, PeerConfig, Transport};

const A: &str = "10.0.2.15";
const B: &str = "10.0.2.20";

fn peer(key: u8, allowed: &[&str]) -> PeerConfig {
    PeerConfig::new(
        Key([key; 32]),
        allowed.iter().map(|a| a.parse().unwrap()).collect(),
    )
}

/// Peer A holds 10.0.2.0/24, peer B the /32 of 10.0.2.20 inside it, so B's
/// packets are B's only by the longest prefix.
fn peers() -> Vec<PeerConfig> {
    vec![
        peer(1, &["10.0.2.0/24", "fd00::/64"]),
        peer(2, &["10.0.2.20/32", "fd00::20/128"]),
    ]
}

/// Small per-peer limits.
fn config() -> Config {
    let mut config = Config::new(
        Transport::WireGuard {
            private_key: Key([9; 32]),
            peers: peers(),
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    config.dns = Some("10.0.2.1:53".parse().unwrap());
    config.max_udp_flows = 4;
    config.max_tcp_connections = 4;
    config.max_tcp_pending_connects = 2;
    config.max_icmp_ids = 2;
    config.max_dns_queries = 2;
    config
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn actions(router: &mut Router) -> Vec<SocketAction> {
    std::iter::from_fn(|| router.poll_socket_action()).collect()
}

fn transmitted(router: &mut Router) -> Vec<BytesMut> {
    std::iter::from_fn(|| router.poll_transmit()).collect()
}

fn udp(router: &mut Router, now: Instant, from: SocketAddr) -> Vec<SocketAction> {
    let packet = packet::build_udp(from, sa("198.18.0.1", 7), b"x").unwrap();
    router.handle_packet(now, &packet);
    actions(router)
}

fn syn(router: &mut Router, now: Instant, from: SocketAddr) -> Vec<SocketAction> {
    let segment = TcpSegment {
        seq: 100,
        syn: true,
        window: 1000,
        ..TcpSegment::default()
    };
    let packet = packet::build_tcp(from, sa("198.18.0.1", 80), &segment).unwrap();
    router.handle_packet(now, &packet);
    actions(router)
}

fn opened(actions: &[SocketAction]) -> Option<FlowId> {
    actions.iter().find_map(|a| match *a {
        SocketAction::UdpOpen { flow, .. }
        | SocketAction::TcpConnect { flow, .. }
        | SocketAction::IcmpOpen { flow, .. } => Some(flow),
        _ => None,
    })
}

fn closed(actions: &[SocketAction]) -> Vec<FlowId> {
    actions
        .iter()
        .filter_map(|a| match *a {
            SocketAction::UdpClose { flow }
            | SocketAction::TcpClose { flow }
            | SocketAction::TcpAbort { flow }
            | SocketAction::IcmpClose { flow } => Some(flow),
            _ => None,
        })
        .collect()
}

fn occupancy(router: &Router, index: usize) -> PeerOccupancy {
    router.peer_stats()[index].occupancy
}

#[test]
fn a_udp_flood_evicts_only_the_flooding_peers_flows() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let b_side = sa(B, 5000);
    let b_flow = opened(&udp(&mut router, now, b_side)).unwrap();
    let mut a_closed = Vec::new();
    for i in 0..100 {
        let later = now + Duration::from_millis(i + 1);
        a_closed.extend(closed(&udp(&mut router, later, sa(A, 1000 + i as u16))));
    }
    assert_eq!(a_closed.len(), 96);
    assert!(!a_closed.contains(&b_flow));
    assert_eq!(router.stats().udp_flows_evicted, 96);
    assert_eq!(occupancy(&router, 0).udp_flows, 4);
    assert_eq!(occupancy(&router, 1).udp_flows, 1);
    assert!(router.within_limits(&config));
    // B's flow still carries replies, and B's next datagram reuses it.
    router.handle_udp_datagram(now, b_flow, sa("198.18.0.1", 7), b"pong");
    assert_eq!(
        transmitted(&mut router),
        vec![packet::build_udp(sa("198.18.0.1", 7), b_side, b"pong").unwrap()]
    );
    let again = udp(&mut router, now + Duration::from_secs(1), b_side);
    assert!(matches!(again[..], [SocketAction::UdpSend { flow, .. }] if flow == b_flow));
}

#[test]
fn a_syn_flood_neither_evicts_nor_refuses_the_other_peers_connects() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let b_flow = opened(&syn(&mut router, now, sa(B, 40000))).unwrap();
    // A floods SYNs to a black hole: its own oldest connects go.
    let mut a_closed = HashSet::new();
    for i in 0..50 {
        let acts = syn(&mut router, now, sa(A, 1000 + i));
        assert!(opened(&acts).is_some(), "A's new SYN proceeds: {acts:?}");
        a_closed.extend(closed(&acts));
    }
    assert_eq!(a_closed.len(), 48);
    assert!(!a_closed.contains(&b_flow));
    assert_eq!(router.stats().tcp_pending_evicted, 48);
    assert_eq!(occupancy(&router, 0).tcp_pending_connects, 2);
    assert_eq!(occupancy(&router, 1).tcp_pending_connects, 1);
    // B's connect completes: SYN-ACK to B.
    router.handle_tcp_connected(now, b_flow);
    actions(&mut router);
    let out = transmitted(&mut router);
    assert_eq!(out.len(), 1);
    assert_eq!(peers::destination_of(&out[0]), Some(B.parse().unwrap()));

    // A fills its connection cap with connects that complete; its next SYN
    // gets a RST, while B's next SYN still opens.
    let mut router = Router::new(&config);
    let mut a_flows = Vec::new();
    for i in 0..4 {
        let acts = syn(&mut router, now, sa(A, 2000 + i));
        let flow = opened(&acts).unwrap();
        router.handle_tcp_connected(now, flow);
        actions(&mut router);
        a_flows.push(flow);
    }
    transmitted(&mut router);
    assert_eq!(occupancy(&router, 0).tcp_connections, 4);
    let acts = syn(&mut router, now, sa(A, 3000));
    assert!(opened(&acts).is_none());
    assert_eq!(router.stats().tcp_refused_limit, 1);
    let rst = transmitted(&mut router);
    assert_eq!(rst.len(), 1);
    assert_eq!(peers::destination_of(&rst[0]), Some(A.parse().unwrap()));
    assert!(opened(&syn(&mut router, now, sa(B, 40001))).is_some());
    assert!(router.within_limits(&config));
}

#[test]
fn an_echo_identity_flood_evicts_only_the_flooding_peers_identities() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let (a, b, net): (IpAddr, IpAddr, IpAddr) = (
        A.parse().unwrap(),
        B.parse().unwrap(),
        "198.18.0.9".parse().unwrap(),
    );
    router.handle_packet(now, &echo_request(b, net, 1));
    let b_flow = opened(&actions(&mut router)).unwrap();
    let mut a_closed = Vec::new();
    for ident in 0..40 {
        let later = now + Duration::from_millis(u64::from(ident) + 1);
        router.handle_packet(later, &echo_request(a, net, ident));
        a_closed.extend(closed(&actions(&mut router)));
    }
    assert_eq!(a_closed.len(), 38);
    assert!(!a_closed.contains(&b_flow));
    assert_eq!(occupancy(&router, 1).icmp_ids, 1);
    router.handle_echo_reply(now, b_flow, net, 7, b"pong");
    let out = transmitted(&mut router);
    assert_eq!(peers::destination_of(&out[0]), Some(b));
}

#[test]
fn dns_queries_in_flight_are_counted_per_peer() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let server = sa("10.0.2.1", 53);
    for id in 0..5 {
        let q = packet::build_udp(sa(A, 5353), server, &dns_query(id)).unwrap();
        router.handle_packet(now, &q);
    }
    assert_eq!(router.stats().dns_over_capacity, 3);
    assert_eq!(occupancy(&router, 0).dns_queries, 2);
    actions(&mut router);
    transmitted(&mut router);
    let q = packet::build_udp(sa(B, 5353), server, &dns_query(9)).unwrap();
    router.handle_packet(now, &q);
    let acts = actions(&mut router);
    assert!(
        matches!(acts[..], [SocketAction::DnsResolve { .. }]),
        "{acts:?}"
    );
    assert_eq!(router.stats().dns_over_capacity, 3);
    assert_eq!(occupancy(&router, 1).dns_queries, 1);
}

#[test]
fn packets_are_attributed_and_counted_by_longest_prefix() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let from_b = packet::build_udp(sa(B, 1), sa("198.18.0.1", 7), b"bb").unwrap();
    let from_a = packet::build_udp(sa("10.0.2.21", 1), sa("198.18.0.1", 7), b"a").unwrap();
    let from_nobody = packet::build_udp(sa("192.0.2.1", 1), sa("198.18.0.1", 7), b"").unwrap();
    router.handle_packet(now, &from_b);
    router.handle_packet(now, &from_a);
    router.handle_packet(now, &from_a);
    router.handle_packet(now, &from_nobody);
    assert_eq!(router.stats().dropped_no_peer, 1);
    let acts = actions(&mut router);
    let b_flow = opened(&acts).unwrap();
    router.handle_udp_datagram(now, b_flow, sa("198.18.0.1", 7), b"reply");
    let reply = transmitted(&mut router).pop().unwrap();

    let stats = router.peer_stats();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].public_key, Some(Key([1; 32])));
    let a = stats[0].counters;
    let b = stats[1].counters;
    assert_eq!((a.packets_from, a.bytes_from), (2, 2 * from_a.len() as u64));
    assert_eq!((b.packets_from, b.bytes_from), (1, from_b.len() as u64));
    assert_eq!((b.packets_to, b.bytes_to), (1, reply.len() as u64));
    assert_eq!(a.packets_to, 0);
    assert_eq!(stats[0].occupancy.udp_flows, 1);
    assert_eq!(stats[1].occupancy.udp_flows, 1);
}

#[test]
fn set_peers_closes_a_removed_peers_flows_and_keeps_the_others() {
    let config = config();
    let mut router = Router::new(&config);
    let now = Instant::now();
    let server = sa("10.0.2.1", 53);
    let net: IpAddr = "198.18.0.9".parse().unwrap();
    let a_udp = opened(&udp(&mut router, now, sa(A, 1))).unwrap();
    let b_udp = opened(&udp(&mut router, now, sa(B, 1))).unwrap();
    let b_tcp = opened(&syn(&mut router, now, sa(B, 2))).unwrap();
    router.handle_tcp_connected(now, b_tcp);
    let b_pending = opened(&syn(&mut router, now, sa(B, 3))).unwrap();
    router.handle_packet(now, &echo_request(B.parse().unwrap(), net, 1));
    let b_icmp = opened(&actions(&mut router)).unwrap();
    let q = packet::build_udp(sa(B, 5353), server, &dns_query(1)).unwrap();
    router.handle_packet(now, &q);
    let Some(SocketAction::DnsResolve { query, .. }) = router.poll_socket_action() else {
        panic!("no lookup");
    };
    transmitted(&mut router);
    let a_before = router.peer_stats()[0].counters;

    router.set_peers(&peers()[..1]);
    let acts = actions(&mut router);
    assert!(acts.contains(&SocketAction::UdpClose { flow: b_udp }));
    assert!(acts.contains(&SocketAction::IcmpClose { flow: b_icmp }));
    assert!(acts.contains(&SocketAction::TcpAbort { flow: b_tcp }));
    assert!(acts.contains(&SocketAction::TcpClose { flow: b_pending }));
    assert!(acts.contains(&SocketAction::DnsCancel { query }));
    assert!(!acts.contains(&SocketAction::UdpClose { flow: a_udp }));
    assert_eq!(acts.len(), 5, "{acts:?}");
    assert_eq!(router.stats().peer_flows_closed, 5);
    assert!(
        transmitted(&mut router).is_empty(),
        "nothing toward the peer"
    );
    // Late results for the closed flows find nothing.
    router.handle_dns_result(now, query, DnsOutcome::NoSuchName);
    router.handle_udp_datagram(now, b_udp, sa("198.18.0.1", 7), b"late");
    assert!(transmitted(&mut router).is_empty());

    let stats = router.peer_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].counters, a_before);
    assert_eq!(stats[0].occupancy.udp_flows, 1);
    assert_eq!(router.occupancy().tcp_connections, 0);
    assert!(router.within_limits(&config));
    // 10.0.2.20 now falls in A's /24.
    let acts = udp(&mut router, now, sa(B, 9));
    assert!(opened(&acts).is_some());
    assert_eq!(router.peer_stats()[0].occupancy.udp_flows, 2);
    // With no peers, nothing gets through.
    router.set_peers(&[]);
    assert_eq!(closed(&actions(&mut router)).len(), 2);
    assert_eq!(udp(&mut router, now, sa(A, 1)), vec![]);
    assert_eq!(router.stats().dropped_no_peer, 1);
}

#[test]
fn a_reverse_forward_belongs_to_the_peer_that_owns_dest() {
    let mut config = config();
    config.incoming_udp = vec!["0.0.0.0:5353,,10.0.2.20:53".parse().unwrap()];
    config.max_udp_flows = 2;
    let mut router = Router::new(&config);
    let now = Instant::now();
    for i in 0..5 {
        router.handle_forward_datagram(now, 0, sa("192.0.2.7", 1000 + i), b"q");
    }
    assert_eq!(transmitted(&mut router).len(), 5);
    // B's sessions, not A's: A's UDP flows are untouched by them.
    assert_eq!(router.peer_stats()[1].counters.packets_to, 5);
    router.set_peers(&peers()[..1]);
    assert_eq!(router.stats().peer_flows_closed, 2);
}
