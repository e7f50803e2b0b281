//! Tests of [`Router::shut_down`]: every flow is closed toward both sides,
//! and new ones are refused, with no sockets and a virtual clock.

use super::packet::TcpSegment;
use super::*;
use crate::config::Transport;

fn config() -> Config {
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    config.incoming_tcp = vec!["127.0.0.1:8080,10.0.2.1:0,10.0.2.15:80".parse().unwrap()];
    config.incoming_udp = vec!["127.0.0.1:5353,10.0.2.1:53,10.0.2.15:53".parse().unwrap()];
    config
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn actions(router: &mut Router) -> Vec<SocketAction> {
    std::iter::from_fn(|| router.poll_socket_action()).collect()
}

/// The TCP segments sent to peers: (source, destination, segment flags).
fn tcp_out(router: &mut Router) -> Vec<(SocketAddr, SocketAddr, bool, bool, bool)> {
    std::iter::from_fn(|| router.poll_transmit())
        .filter_map(|p| match packet::parse(&p) {
            Ok(packet::Parsed::Tcp { src, dst, segment }) => {
                Some((src, dst, segment.syn, segment.fin, segment.rst))
            }
            _ => None,
        })
        .collect()
}

/// An ICMP echo request from 10.0.2.15 to `dst`.
fn echo_request(dst: &str) -> BytesMut {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr};
    let src: IpAddr = "10.0.2.15".parse().unwrap();
    // A reply with the roles swapped, turned into a request.
    let mut packet = packet::build_echo_reply(src, dst.parse().unwrap(), 9, 1, b"ping").unwrap();
    let repr = Icmpv4Repr::EchoRequest {
        ident: 9,
        seq_no: 1,
        data: b"ping",
    };
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut packet[20..]),
        &ChecksumCapabilities::default(),
    );
    packet
}

fn syn(src: SocketAddr, dst: SocketAddr) -> BytesMut {
    let segment = TcpSegment {
        seq: 1000,
        syn: true,
        window: 64240,
        ..TcpSegment::default()
    };
    packet::build_tcp(src, dst, &segment).unwrap()
}

/// An established connection from `peer` to `remote`; returns its flow.
fn established(router: &mut Router, now: Instant, peer: SocketAddr, remote: SocketAddr) -> FlowId {
    router.handle_packet(now, &syn(peer, remote));
    let [SocketAction::TcpConnect { flow, .. }] = actions(router)[..] else {
        panic!("no connect");
    };
    router.handle_tcp_connected(now, flow);
    actions(router);
    let syn_ack = std::iter::from_fn(|| router.poll_transmit())
        .find_map(|p| match packet::parse(&p) {
            Ok(packet::Parsed::Tcp { segment, .. }) if segment.syn => Some(segment.seq),
            _ => None,
        })
        .expect("SYN-ACK");
    let ack = TcpSegment {
        seq: 1001,
        ack: Some(syn_ack.wrapping_add(1)),
        window: 64240,
        ..TcpSegment::default()
    };
    router.handle_packet(now, &packet::build_tcp(peer, remote, &ack).unwrap());
    actions(router);
    flow
}

#[test]
fn shut_down_resets_every_tcp_connection_both_ways() {
    let mut router = Router::with_secret(&config(), [1; 16]);
    let now = Instant::now();
    let peer = sa("10.0.2.15:40000");
    let open = established(&mut router, now, peer, sa("198.18.2.2:80"));
    // A second one still connecting on the host side.
    router.handle_packet(now, &syn(sa("10.0.2.15:40001"), sa("198.18.2.2:81")));
    let [
        SocketAction::TcpConnect {
            flow: connecting, ..
        },
    ] = actions(&mut router)[..]
    else {
        panic!("no connect");
    };
    // A reverse (-t) connection whose SYN went to the peer.
    let reverse = router
        .handle_tcp_accepted(now, 0, sa("127.0.0.1:50000"))
        .expect("accepted");
    assert_eq!(tcp_out(&mut router).len(), 1, "our SYN toward DEST");
    assert_eq!(router.occupancy().tcp_connections, 3);

    router.shut_down(now);
    assert!(router.is_shutting_down());
    let mut got = actions(&mut router);
    got.sort_by_key(|a| format!("{a:?}"));
    let mut want = vec![
        SocketAction::TcpAbort { flow: open },
        SocketAction::TcpAbort { flow: connecting },
        SocketAction::TcpAbort { flow: reverse },
    ];
    want.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(
        got, want,
        "every host socket aborted (RST to the host side)"
    );
    let out = tcp_out(&mut router);
    assert!(out.iter().all(|&(_, _, syn, fin, rst)| rst && !syn && !fin));
    // One RST per connection, two where sent bytes (here the -t SYN) are
    // unacknowledged: at the peer's two possible next sequence numbers.
    let mut connections: Vec<_> = out.iter().map(|&(src, dst, ..)| (src, dst)).collect();
    connections.dedup();
    assert_eq!(
        connections.len(),
        3,
        "a RST toward the peer for each: {out:?}"
    );
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(router.occupancy(), Occupancy::default());
    assert_eq!(router.poll_timeout(), None, "nothing left to time out");
    assert_eq!(router.stats().flows_closed_at_shutdown, 3);
}

#[test]
fn shut_down_closes_udp_icmp_and_cancels_dns() {
    let mut config = config();
    config.dns = Some(sa("10.0.2.1:53"));
    let mut router = Router::with_secret(&config, [1; 16]);
    let now = Instant::now();
    let peer = sa("10.0.2.15:5000");
    router.handle_packet(
        now,
        &packet::build_udp(peer, sa("198.18.2.2:7"), b"q").unwrap(),
    );
    let echo = echo_request("198.18.2.2");
    router.handle_packet(now, &echo);
    // A DNS query for a name: it waits for the resolver.
    let query = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l',
        b'e', 3, b'c', b'o', b'm', 0, 0, 1, 0, 1,
    ];
    router.handle_packet(
        now,
        &packet::build_udp(sa("10.0.2.15:5001"), sa("10.0.2.1:53"), &query).unwrap(),
    );
    let opened = actions(&mut router);
    let udp = opened.iter().find_map(|a| match a {
        SocketAction::UdpOpen { flow, .. } => Some(*flow),
        _ => None,
    });
    let icmp = opened.iter().find_map(|a| match a {
        SocketAction::IcmpOpen { flow, .. } => Some(*flow),
        _ => None,
    });
    let dns = opened.iter().find_map(|a| match a {
        SocketAction::DnsResolve { query, .. } => Some(*query),
        _ => None,
    });
    let (Some(udp), Some(icmp), Some(dns)) = (udp, icmp, dns) else {
        panic!("{opened:?}");
    };

    router.shut_down(now);
    let got = actions(&mut router);
    assert!(
        got.contains(&SocketAction::UdpClose { flow: udp }),
        "{got:?}"
    );
    assert!(
        got.contains(&SocketAction::IcmpClose { flow: icmp }),
        "{got:?}"
    );
    assert!(
        got.contains(&SocketAction::DnsCancel { query: dns }),
        "{got:?}"
    );
    assert_eq!(router.occupancy(), Occupancy::default());
    assert_eq!(router.poll_timeout(), None);
}

#[test]
fn after_shut_down_new_flows_are_refused() {
    let mut config = config();
    config.pingable = vec!["10.0.2.1".parse().unwrap()];
    let mut router = Router::with_secret(&config, [1; 16]);
    let now = Instant::now();
    router.shut_down(now);
    actions(&mut router);

    // A SYN gets RST and opens nothing.
    let peer = sa("10.0.2.15:40000");
    let remote = sa("198.18.2.2:80");
    router.handle_packet(now, &syn(peer, remote));
    assert_eq!(actions(&mut router), vec![]);
    assert_eq!(
        tcp_out(&mut router),
        vec![(remote, peer, false, false, true)]
    );

    // UDP, pings (even to the pingable address) and -u datagrams: dropped.
    router.handle_packet(
        now,
        &packet::build_udp(sa("10.0.2.15:5000"), sa("198.18.2.2:7"), b"q").unwrap(),
    );
    let echo = echo_request("10.0.2.1");
    router.handle_packet(now, &echo);
    router.handle_forward_datagram(now, 0, sa("127.0.0.1:40000"), b"x");
    assert_eq!(actions(&mut router), vec![]);
    assert_eq!(router.poll_transmit(), None);
    assert_eq!(router.stats().dropped_shutdown, 3);

    // A -t connection is refused: the driver resets it.
    assert_eq!(
        router.handle_tcp_accepted(now, 0, sa("127.0.0.1:50000")),
        None
    );
    assert_eq!(router.occupancy(), Occupancy::default());
}
