//! DNS server tests through the router: query packets in, resolver and
//! forwarding actions out, results in, answer packets out, on a virtual
//! clock.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, RCODE};

use super::*;
use crate::config::Transport;

const DNS: &str = "10.0.2.3:53";
const PEER: &str = "10.0.2.15:40000";
const TYPE_A: u16 = 1;
const TYPE_MX: u16 = 15;
const TYPE_AAAA: u16 = 28;

fn config() -> Config {
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        "127.0.0.1:0".parse().unwrap(),
    );
    config.dns = Some(sa(DNS));
    config
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A query as `dig` makes it: RD and AD set, and with `edns` an OPT record
/// advertising that size.
fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if let Some(size) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0; 6]);
    }
    m
}

/// Sends `message` from `peer` to `server` through the router.
fn send(router: &mut Router, now: Instant, peer: &str, server: &str, message: &[u8]) {
    router.handle_packet(
        now,
        &packet::build_udp(sa(peer), sa(server), message).unwrap(),
    );
}

fn actions(router: &mut Router) -> Vec<SocketAction> {
    std::iter::from_fn(|| router.poll_socket_action()).collect()
}

/// The DNS payloads of the UDP packets queued for `peer` from `server`.
fn answers(router: &mut Router, peer: &str, server: &str) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| router.poll_transmit())
        .map(|packet| match packet::parse(&packet) {
            Ok(packet::Parsed::Udp { src, dst, payload }) => {
                assert_eq!((src, dst), (sa(server), sa(peer)), "answer misaddressed");
                payload.to_vec()
            }
            other => panic!("not a UDP packet: {other:?}"),
        })
        .collect()
}

fn one_answer(router: &mut Router) -> Vec<u8> {
    let mut all = answers(router, PEER, DNS);
    assert_eq!(all.len(), 1, "wanted exactly one answer");
    all.remove(0)
}

/// Sends a query and returns the id of the resolve action it caused.
fn resolve_query(router: &mut Router, now: Instant, message: &[u8]) -> (DnsQueryId, String) {
    send(router, now, PEER, DNS, message);
    match actions(router).as_slice() {
        [SocketAction::DnsResolve { query, name }] => (*query, name.clone()),
        other => panic!("wanted one resolve action, got {other:?}"),
    }
}

/// Checks the parts every answer to `request` shares: ID, QR, RA, RD, the
/// question echoed byte for byte, the rcode.
#[track_caller]
fn check_answer<'a>(answer: &'a [u8], request: &[u8], rcode: RCODE) -> Packet<'a> {
    let packet = Packet::parse(answer).expect("answer parses");
    assert_eq!(answer[..2], request[..2], "ID not preserved");
    assert!(packet.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_AVAILABLE));
    assert!(packet.has_flags(PacketFlag::RECURSION_DESIRED));
    assert_eq!(packet.rcode(), rcode);
    let question_len = request.len() - 12 - 11 * usize::from(request[11]);
    assert_eq!(
        answer[12..12 + question_len],
        request[12..12 + question_len],
        "question not echoed"
    );
    packet
}

fn addresses(packet: &Packet<'_>) -> Vec<IpAddr> {
    packet
        .answers
        .iter()
        .map(|record| {
            assert_eq!(record.ttl, dns::TTL);
            match &record.rdata {
                RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                RData::AAAA(aaaa) => IpAddr::V6(Ipv6Addr::from(aaaa.address)),
                other => panic!("unexpected record {other:?}"),
            }
        })
        .collect()
}

fn both_families() -> DnsOutcome {
    DnsOutcome::Addresses(vec![
        "198.18.2.2".parse().unwrap(),
        "fd00:2::2".parse().unwrap(),
        "198.18.2.2".parse().unwrap(),
        "198.18.2.9".parse().unwrap(),
    ])
}

#[test]
fn a_and_aaaa_are_resolved_by_the_host_with_exactly_the_type_asked() {
    for (qtype, expected) in [
        (TYPE_A, vec!["198.18.2.2", "198.18.2.9"]),
        (TYPE_AAAA, vec!["fd00:2::2"]),
    ] {
        let mut router = Router::new(&config());
        let now = Instant::now();
        let request = query(0xbeef, "Internet.Test.", qtype, Some(1232));
        let (id, name) = resolve_query(&mut router, now, &request);
        // Case kept, trailing dot dropped: glibc matches /etc/hosts without it.
        assert_eq!(name, "Internet.Test");
        assert!(
            router.poll_transmit().is_none(),
            "answered before the lookup"
        );
        router.handle_dns_result(now, id, both_families());
        let answer = one_answer(&mut router);
        let packet = check_answer(&answer, &request, RCODE::NoError);
        let expected: Vec<IpAddr> = expected.iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(addresses(&packet), expected);
        assert!(packet.opt().is_some(), "EDNS query got no OPT back");
        assert_eq!(router.stats().dns_resolved, 1);
        assert_eq!(router.poll_timeout(), None, "deadline left behind");
    }
}

#[test]
fn missing_name_is_nxdomain_and_name_without_the_type_is_empty_noerror() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let request = query(1, "missing.test", TYPE_A, None);
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(now, id, DnsOutcome::NoSuchName);
    let answer = one_answer(&mut router);
    let packet = check_answer(&answer, &request, RCODE::NameError);
    assert!(packet.answers.is_empty() && packet.opt().is_none());

    // A v4-only name asked for AAAA: it exists, so NOERROR with no answers.
    let request = query(2, "v4only.test", TYPE_AAAA, None);
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(
        now,
        id,
        DnsOutcome::Addresses(vec!["198.18.2.7".parse().unwrap()]),
    );
    let answer = one_answer(&mut router);
    assert!(
        check_answer(&answer, &request, RCODE::NoError)
            .answers
            .is_empty()
    );
    assert_eq!(router.stats().dns_nxdomain, 1);
}

#[test]
fn address_literals_are_not_echoed_back() {
    let mut router = Router::new(&config());
    let request = query(3, "198.18.2.2", TYPE_A, None);
    send(&mut router, Instant::now(), PEER, DNS, &request);
    assert!(actions(&mut router).is_empty());
    check_answer(&one_answer(&mut router), &request, RCODE::NameError);
}

#[test]
fn lookup_failure_is_servfail() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let request = query(4, "flaky.test", TYPE_A, None);
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(now, id, DnsOutcome::Failed);
    check_answer(&one_answer(&mut router), &request, RCODE::ServerFailure);
    assert_eq!(router.stats().dns_servfail, 1);
}

#[test]
fn malformed_queries_get_formerr_when_the_header_is_readable() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    // A header claiming one question, then a label running off the end.
    let mut broken = query(0x4242, "example.test", TYPE_A, None);
    broken.truncate(15);
    send(&mut router, now, PEER, DNS, &broken);
    let answer = one_answer(&mut router);
    assert_eq!(answer.len(), 12, "FORMERR carries the header only");
    assert_eq!(answer[..2], [0x42, 0x42]);
    assert_eq!(answer[3] & 0x0f, 1, "not FORMERR");
    assert_eq!(answer[2] & 0x80, 0x80, "not a response");

    // Counts that the message cannot hold.
    let mut huge = query(5, "a.test", TYPE_A, None);
    huge[6..12].copy_from_slice(&[0xff; 6]);
    send(&mut router, now, PEER, DNS, &huge);
    assert_eq!(one_answer(&mut router)[3] & 0x0f, 1);

    // Two questions.
    let mut two = query(6, "a.test", TYPE_A, None);
    two[5] = 2;
    send(&mut router, now, PEER, DNS, &two);
    assert_eq!(one_answer(&mut router)[3] & 0x0f, 1);

    // An opcode other than QUERY (here NOTIFY) is not implemented.
    let mut notify = query(7, "a.test", TYPE_A, None);
    notify[2] = 4 << 3;
    send(&mut router, now, PEER, DNS, &notify);
    assert_eq!(one_answer(&mut router)[3] & 0x0f, 4);

    // No header, or a response rather than a query: dropped in silence.
    send(&mut router, now, PEER, DNS, &[1, 2, 3]);
    let mut response = query(8, "a.test", TYPE_A, None);
    response[2] |= 0x80;
    send(&mut router, now, PEER, DNS, &response);
    assert!(answers(&mut router, PEER, DNS).is_empty());
    assert!(actions(&mut router).is_empty());
    let stats = router.stats();
    assert_eq!((stats.dns_errors, stats.dns_dropped), (4, 2));
}

#[test]
fn unanswered_query_times_out_with_servfail_and_a_cancel() {
    let config = config();
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    let request = query(9, "slow.test", TYPE_A, Some(1232));
    let (id, _) = resolve_query(&mut router, t0, &request);
    assert_eq!(router.poll_timeout(), Some(t0 + config.dns_timeout));
    router.handle_timeout(t0 + config.dns_timeout - Duration::from_millis(1));
    assert!(router.poll_transmit().is_none());

    router.handle_timeout(t0 + config.dns_timeout);
    check_answer(&one_answer(&mut router), &request, RCODE::ServerFailure);
    assert_eq!(
        actions(&mut router),
        vec![SocketAction::DnsCancel { query: id }]
    );
    assert_eq!(router.poll_timeout(), None);
    assert_eq!(router.stats().dns_timeouts, 1);

    // The result that comes too late is ignored: one answer per query.
    router.handle_dns_result(t0 + config.dns_timeout, id, both_families());
    assert!(router.poll_transmit().is_none());
}

#[test]
fn dns_and_udp_deadlines_fold_into_one() {
    let config = config();
    let mut router = Router::new(&config);
    let t0 = Instant::now();
    send(&mut router, t0, PEER, "198.18.2.2:7", b"x");
    assert_eq!(actions(&mut router).len(), 2, "UDP open and send");
    let later = t0 + Duration::from_secs(1);
    resolve_query(&mut router, later, &query(10, "a.test", TYPE_A, None));
    assert_eq!(router.poll_timeout(), Some(later + config.dns_timeout));
}

#[test]
fn queries_in_flight_are_capped() {
    let mut config = config();
    config.max_dns_queries = 2;
    let mut router = Router::new(&config);
    let now = Instant::now();
    for id in 0..2 {
        send(
            &mut router,
            now,
            PEER,
            DNS,
            &query(id, "a.test", TYPE_A, None),
        );
    }
    assert_eq!(actions(&mut router).len(), 2);
    assert!(router.poll_transmit().is_none());
    let request = query(2, "a.test", TYPE_MX, None);
    send(&mut router, now, PEER, DNS, &request);
    assert!(actions(&mut router).is_empty());
    check_answer(&one_answer(&mut router), &request, RCODE::ServerFailure);
    assert_eq!(router.stats().dns_over_capacity, 1);
}

#[test]
fn other_types_are_forwarded_and_relayed_unchanged_but_for_the_id() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let request = query(0x1111, "mail.test", TYPE_MX, Some(1232));
    send(&mut router, now, PEER, DNS, &request);
    let id = match actions(&mut router).as_slice() {
        [SocketAction::DnsForward { query, message }] => {
            assert_eq!(message[..], request[..], "forwarded query changed");
            *query
        }
        other => panic!("wanted one forward action, got {other:?}"),
    };
    // The nameserver's answer, as the driver got it (with its own ID): one
    // MX record and an OPT record of its own.
    let mut upstream = request.clone();
    upstream[..2].copy_from_slice(&[0x77, 0x77]);
    upstream[2] = 0x81;
    upstream[3] = 0x80;
    upstream[6..8].copy_from_slice(&[0, 1]);
    let opt = upstream.split_off(upstream.len() - 11);
    upstream.extend_from_slice(&[0xc0, 12, 0, 15, 0, 1, 0, 0, 1, 0x2c, 0, 4, 0, 10, 0xc0, 12]);
    upstream.extend_from_slice(&[0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
    assert_ne!(opt, upstream[upstream.len() - 11..], "OPT should differ");
    router.handle_dns_result(now, id, DnsOutcome::Upstream(Bytes::from(upstream.clone())));
    let answer = one_answer(&mut router);
    assert_eq!(answer[..2], request[..2]);
    assert_eq!(answer[2..], upstream[2..], "answer not relayed unchanged");
    assert_eq!(router.stats().dns_forwarded, 1);
}

#[test]
fn forwarding_without_a_nameserver_is_notimp_and_a_wrong_answer_servfail() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    for (outcome, rcode) in [
        (DnsOutcome::NoNameserver, RCODE::NotImplemented),
        (DnsOutcome::Failed, RCODE::ServerFailure),
        (
            // An answer to another question.
            DnsOutcome::Upstream(Bytes::from({
                let mut other = query(0, "evil.test", TYPE_MX, None);
                other[2] |= 0x80;
                other
            })),
            RCODE::ServerFailure,
        ),
    ] {
        let request = query(0x2222, "Mail.Test", TYPE_MX, None);
        send(&mut router, now, PEER, DNS, &request);
        let Some(SocketAction::DnsForward { query: id, .. }) = router.poll_socket_action() else {
            panic!("not forwarded");
        };
        router.handle_dns_result(now, id, outcome);
        check_answer(&one_answer(&mut router), &request, rcode);
    }
}

#[test]
fn answers_fit_the_client_size_and_set_tc_when_cut() {
    let mut router = Router::new(&config());
    let now = Instant::now();
    let many: Vec<IpAddr> = (0..100u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 3, i)))
        .collect();
    // No EDNS: 512 bytes at most.
    let request = query(1, "many.test", TYPE_A, None);
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(now, id, DnsOutcome::Addresses(many.clone()));
    let answer = one_answer(&mut router);
    assert!(answer.len() <= 512, "{} bytes", answer.len());
    let packet = check_answer(&answer, &request, RCODE::NoError);
    assert!(packet.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(addresses(&packet), many[..packet.answers.len()]);
    assert!(packet.answers.len() > 20);

    // EDNS with a big size: the tunnel MTU (1420) is the limit instead.
    let request = query(2, "many.test", TYPE_A, Some(4096));
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(now, id, DnsOutcome::Addresses(many.clone()));
    let answer = one_answer(&mut router);
    assert!(answer.len() <= 1420 - 28 && answer.len() > 512);
    let packet = check_answer(&answer, &request, RCODE::NoError);
    assert!(packet.has_flags(PacketFlag::TRUNCATION));

    // A small set fits whole, without TC.
    let request = query(3, "few.test", TYPE_A, None);
    let (id, _) = resolve_query(&mut router, now, &request);
    router.handle_dns_result(now, id, DnsOutcome::Addresses(many[..3].to_vec()));
    let answer = one_answer(&mut router);
    assert!(!check_answer(&answer, &request, RCODE::NoError).has_flags(PacketFlag::TRUNCATION));

    // An upstream answer too big for a plain (512-byte) client is cut to
    // header and question, with TC.
    let request = query(4, "big.test", 16, None);
    send(&mut router, now, PEER, DNS, &request);
    let Some(SocketAction::DnsForward { query: id, .. }) = router.poll_socket_action() else {
        panic!("not forwarded");
    };
    let mut upstream = request.clone();
    upstream[2] |= 0x80;
    upstream[3] = 0x80;
    upstream[7] = 1;
    upstream.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, 2, 0x58]);
    upstream.extend_from_slice(&[b'x'; 600]);
    router.handle_dns_result(now, id, DnsOutcome::Upstream(Bytes::from(upstream)));
    let answer = one_answer(&mut router);
    let packet = check_answer(&answer, &request, RCODE::NoError);
    assert!(packet.has_flags(PacketFlag::TRUNCATION) && packet.answers.is_empty());
    assert_eq!(answer.len(), request.len());
    assert_eq!(router.stats().dns_truncated, 3);
}

#[test]
fn the_dns_address_on_another_port_is_forwarded_as_udp() {
    let mut router = Router::new(&config());
    send(
        &mut router,
        Instant::now(),
        PEER,
        "10.0.2.3:5353",
        b"not dns",
    );
    let acts = actions(&mut router);
    assert!(
        matches!(acts.as_slice(), [SocketAction::UdpOpen { .. }, SocketAction::UdpSend { dest, .. }] if *dest == sa("10.0.2.3:5353")),
        "{acts:?}"
    );
    assert_eq!(router.stats().dns_queries, 0);
}

#[test]
fn ipv6_server_answers_within_the_v6_mtu() {
    let mut config = config();
    config.dns = Some(sa("[fd00::3]:53"));
    let mut router = Router::new(&config);
    let now = Instant::now();
    let (peer, server) = ("[fd00::2]:40000", "[fd00::3]:53");
    let request = query(5, "many.test", TYPE_AAAA, Some(65000));
    send(&mut router, now, peer, server, &request);
    let Some(SocketAction::DnsResolve { query: id, .. }) = router.poll_socket_action() else {
        panic!("not resolved");
    };
    let many: Vec<IpAddr> = (0..100u16)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, i)))
        .collect();
    router.handle_dns_result(now, id, DnsOutcome::Addresses(many));
    let all = answers(&mut router, peer, server);
    assert_eq!(all.len(), 1);
    assert!(all[0].len() <= 1420 - 48);
    let packet = check_answer(&all[0], &request, RCODE::NoError);
    assert!(packet.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(packet.answers.len(), (1420 - 48 - 12 - 15 - 11) / 28);
}

/// DNS over TCP to the server's address: the connection is answered by the
/// router itself (no host connect), two queries in one segment are both
/// answered, framed, and the peer's FIN gets ours once all is answered.
#[test]
fn dns_over_tcp_is_served_by_the_router() {
    use crate::core::packet::TcpSegment;

    let mut router = Router::new(&config());
    let now = Instant::now();
    let (peer, server) = (sa(PEER), sa(DNS));
    let segment = |router: &mut Router, segment: TcpSegment<'_>| {
        router.handle_packet(now, &packet::build_tcp(peer, server, &segment).unwrap());
    };
    /// A segment to the peer: sequence number, ACK, SYN, FIN, payload.
    type Seg = (u32, Option<u32>, bool, bool, Vec<u8>);
    let segments = |router: &mut Router| -> Vec<Seg> {
        std::iter::from_fn(|| router.poll_transmit())
            .map(|p| match packet::parse(&p) {
                Ok(packet::Parsed::Tcp { src, dst, segment }) => {
                    assert_eq!((src, dst), (server, peer));
                    (
                        segment.seq,
                        segment.ack,
                        segment.syn,
                        segment.fin,
                        segment.payload.to_vec(),
                    )
                }
                other => panic!("not TCP: {other:?}"),
            })
            .collect()
    };

    segment(
        &mut router,
        TcpSegment {
            seq: 1000,
            syn: true,
            window: 65535,
            ..TcpSegment::default()
        },
    );
    assert!(
        actions(&mut router).is_empty(),
        "no host socket for the DNS server"
    );
    let syn_ack = segments(&mut router);
    let [(server_isn, Some(1001), true, false, _)] = syn_ack[..] else {
        panic!("no SYN-ACK: {syn_ack:?}");
    };
    let mut ack = server_isn.wrapping_add(1);
    segment(
        &mut router,
        TcpSegment {
            seq: 1001,
            ack: Some(ack),
            window: 65535,
            ..TcpSegment::default()
        },
    );

    // Two queries in one segment: an A query (resolved by the host) and a
    // malformed one (answered at once with FORMERR).
    let a_query = query(7, "www.test", TYPE_A, None);
    let bad_query = [0, 9, 0x01, 0x00, 0, 2, 0, 0, 0, 0, 0, 0];
    let mut stream = Vec::new();
    for message in [&a_query[..], &bad_query[..]] {
        stream.extend_from_slice(&(message.len() as u16).to_be_bytes());
        stream.extend_from_slice(message);
    }
    segment(
        &mut router,
        TcpSegment {
            seq: 1001,
            ack: Some(ack),
            window: 65535,
            payload: &stream,
            ..TcpSegment::default()
        },
    );
    let query_id = match actions(&mut router).as_slice() {
        [SocketAction::DnsResolve { query, name }] if name == "www.test" => *query,
        other => panic!("wanted one resolve, got {other:?}"),
    };
    let mut received: Vec<u8> = segments(&mut router)
        .into_iter()
        .flat_map(|s| s.4)
        .collect();
    ack = ack.wrapping_add(received.len() as u32);

    // The peer is done sending; the answer to the A query is still owed.
    let fin_seq = 1001 + stream.len() as u32;
    segment(
        &mut router,
        TcpSegment {
            seq: fin_seq,
            ack: Some(ack),
            fin: true,
            window: 65535,
            ..TcpSegment::default()
        },
    );
    // The driver drains actions after every input; the router keeps those
    // of DNS-over-TCP connections to itself.
    assert!(actions(&mut router).is_empty());
    assert!(
        !segments(&mut router).iter().any(|s| s.3),
        "FIN before every answer"
    );

    router.handle_dns_result(now, query_id, both_families());
    assert!(actions(&mut router).is_empty());
    let tail = segments(&mut router);
    // Our FIN follows the last answer, here in the same segment.
    assert!(
        tail.last().is_some_and(|s| s.3),
        "no FIN after the last answer: {tail:?}"
    );
    received.extend(tail.into_iter().flat_map(|s| s.4));

    // Both answers, framed, in the order they were ready.
    let mut messages = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        messages.push(rest[2..2 + len].to_vec());
        rest = &rest[2 + len..];
    }
    assert!(rest.is_empty());
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0][..2], [0, 9], "FORMERR first");
    let answer = check_answer(&messages[1], &a_query, RCODE::NoError);
    assert_eq!(addresses(&answer).len(), 2);
}
