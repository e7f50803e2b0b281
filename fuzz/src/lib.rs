//! The fuzz targets' bodies, one function per target, so that each target
//! file is one line and the bodies can be replayed by `cargo test` here.
//!
//! Each body feeds untrusted bytes to one entry point and checks what must
//! hold for any input: no panic (the fuzzer's own check), and the bounded
//! tables within their limits. Hangs show up as libFuzzer timeouts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{BufMut as _, Bytes};
use libwgslirpy::Config;
use libwgslirpy::config::{Key, PeerConfig, Transport};
use libwgslirpy::core::dns::{DnsClient, DnsOutcome, DnsServer};
use libwgslirpy::core::fragment::Reassembler;
use libwgslirpy::core::packet::{self, IcmpError, TcpSegment};
use libwgslirpy::core::shard::Shards;
use libwgslirpy::core::{ConnectError, FlowId, PeerId, Router, SocketAction, Stats};

/// `packet::parse`, and the ICMP error builder that quotes a packet.
pub fn packet_parse(data: &[u8]) {
    let _ = packet::parse(data);
    let _ = packet::build_icmp_error(data, IcmpError::AdminProhibited);
}

/// The reassembler, fed a sequence of packets: each is a length byte pair
/// (little endian, modulo 2048) and that many bytes, then one byte of time
/// passing (in 100 ms steps).
pub fn reassembler(data: &[u8]) {
    const MAX: usize = 16 << 10;
    let mut reassembler = Reassembler::new(MAX, Duration::from_secs(30));
    let mut now = Instant::now();
    let mut input = Input(data);
    while let Some(packet) = input.packet() {
        let _ = reassembler.handle(now, packet);
        assert!(reassembler.held_bytes() <= MAX);
        now += Duration::from_millis(100 * u64::from(input.byte().unwrap_or(0)));
        if reassembler.next_expiry().is_some_and(|at| at <= now) {
            reassembler.expire(now);
        }
    }
    reassembler.expire(now + Duration::from_secs(31));
    assert_eq!(reassembler.held_bytes(), 0);
    assert!(reassembler.is_empty());
}

/// The DNS server's query path, and the completion of a forwarded query
/// with an upstream answer: the first byte pair is the length of the query,
/// the rest the answer.
pub fn dns_query(data: &[u8]) {
    let server: SocketAddr = "10.0.2.1:53".parse().expect("literal");
    let peer: SocketAddr = "10.0.2.15:5353".parse().expect("literal");
    let mut dns = DnsServer::new(server, Duration::from_secs(5), 4);
    let mut actions = std::collections::VecDeque::new();
    let mut stats = Stats::default();
    let mut input = Input(data);
    let Some(query) = input.packet() else {
        return;
    };
    let answer = input.rest();
    let now = Instant::now();
    let client = DnsClient::Udp { peer };
    if let Some(reply) = dns.query(
        now,
        PeerId(0),
        client,
        query,
        1392,
        &mut actions,
        &mut stats,
    ) {
        assert!(reply.len() <= 1392);
    }
    while let Some(action) = actions.pop_front() {
        let (id, outcome) = match action {
            SocketAction::DnsForward { query, .. } => {
                (query, DnsOutcome::Upstream(Bytes::copy_from_slice(answer)))
            }
            SocketAction::DnsResolve { query, .. } => {
                let addresses = answer
                    .chunks_exact(4)
                    .map(|a| IpAddr::from([a[0], a[1], a[2], a[3]]))
                    .collect();
                (query, DnsOutcome::Addresses(addresses))
            }
            _ => continue,
        };
        if let Some(answer) = dns.complete(id, outcome, &mut stats) {
            assert!(answer.message.len() <= 1392);
        }
    }
    assert_eq!(dns.in_flight(), 0);
}

/// Small limits, so that fuzzing reaches them, and two peers: the IPv4
/// endpoints are one's, the IPv6 endpoints the other's.
fn config() -> Config {
    let peer = |key: u8, allowed: &str| PeerConfig {
        public_key: Key([key; 32]),
        preshared_key: None,
        endpoint: None,
        keepalive: None,
        allowed_ips: vec![allowed.parse().expect("literal")],
    };
    let mut config = Config::new(
        Transport::WireGuard {
            private_key: Key([9; 32]),
            peers: vec![peer(1, "10.0.2.0/24"), peer(2, "fd00::/64")],
        },
        "127.0.0.1:0".parse().expect("literal"),
    );
    config.pingable = vec![
        Ipv4Addr::new(10, 0, 2, 1).into(),
        "fd00::1".parse().expect("literal"),
    ];
    config.dns = Some("10.0.2.1:53".parse().expect("literal"));
    config.max_udp_flows = 16;
    config.max_tcp_connections = 16;
    config.max_tcp_pending_connects = 8;
    config.max_icmp_ids = 8;
    config.max_dns_queries = 8;
    config.max_reassembly_bytes = 16 << 10;
    config.transmit_queue_capacity = 64;
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

/// `Router::handle_packet` with one arbitrary packet, then a timeout.
pub fn router_packet(data: &[u8]) {
    let config = config();
    let mut router = Router::with_secret(&config, [7; 16]);
    let now = Instant::now();
    router.handle_packet(now, data);
    let mut flows = Flows::default();
    flows.drain(&mut router);
    router.handle_timeout(now + Duration::from_secs(3600));
    flows.drain(&mut router);
    assert_within_limits(&router, &config);
}

/// The shards of [`router_sequence`]'s gateway: its router is the first of
/// two, so that fragments reassembled for the other are handed on.
const SHARDS: Shards = Shards::new(2);

/// Flows the router asked the driver to open, for socket events.
#[derive(Default)]
struct Flows {
    tcp: Vec<FlowId>,
    udp: Vec<FlowId>,
    icmp: Vec<FlowId>,
}

impl Flows {
    /// Drains the router as the driver does, remembering new flows; at most
    /// a bounded number of outputs per input.
    fn drain(&mut self, router: &mut Router) {
        let mut outputs = 0;
        while let Some(action) = router.poll_socket_action() {
            outputs += 1;
            match action {
                SocketAction::TcpConnect { flow, .. } => push(&mut self.tcp, flow),
                SocketAction::UdpOpen { flow, .. } => push(&mut self.udp, flow),
                SocketAction::IcmpOpen { flow, .. } => push(&mut self.icmp, flow),
                _ => {}
            }
        }
        while router.poll_transmit().is_some() {
            outputs += 1;
            assert!(outputs < 10_000, "unbounded output for one input");
        }
        // The router is shard 0 of 2: what it hands on is shard 1's.
        while let Some((shard, packet)) = router.poll_reroute() {
            assert_eq!((shard, SHARDS.of_packet(&packet)), (1, 1));
        }
    }
}

fn push(list: &mut Vec<FlowId>, flow: FlowId) {
    if list.len() >= 32 {
        list.remove(0);
    }
    list.push(flow);
}

/// A short script of inputs to one router: packets (raw, or built from a
/// few bytes so that checksums are right and TCP state is reachable),
/// socket events for the flows it opened, and time passing.
pub fn router_sequence(data: &[u8]) {
    let config = SHARDS.config_for_each(&config());
    let mut router = Router::with_secret(&config, [7; 16]).in_shard(0, SHARDS);
    let mut now = Instant::now();
    let mut flows = Flows::default();
    let mut input = Input(data);
    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 256 {
            break;
        }
        let pick = |list: &[FlowId], b: Option<u8>| -> Option<FlowId> {
            (!list.is_empty()).then(|| list[usize::from(b.unwrap_or(0)) % list.len()])
        };
        match op % 10 {
            0 => {
                let Some(packet) = input.packet() else { break };
                router.handle_packet(now, packet);
            }
            // Built packets are handed over, as the driver does, so that
            // payloads kept for sockets are views of them.
            1 => {
                if let Some(packet) = input.tcp_packet() {
                    router.handle_owned_packet(now, packet.freeze());
                }
            }
            2 => {
                if let Some(packet) = input.udp_or_echo_packet() {
                    router.handle_owned_packet(now, packet.freeze());
                }
            }
            3 => {
                now += Duration::from_millis(50 * u64::from(input.byte().unwrap_or(0)));
                if router.poll_timeout().is_some_and(|at| at <= now) {
                    router.handle_timeout(now);
                }
            }
            4 => {
                if let Some(flow) = pick(&flows.tcp, input.byte()) {
                    router.handle_tcp_connected(now, flow);
                }
            }
            5 => {
                let error = match input.byte().unwrap_or(0) % 6 {
                    0 => ConnectError::Refused,
                    1 => ConnectError::NetUnreachable,
                    2 => ConnectError::HostUnreachable,
                    3 => ConnectError::TimedOut,
                    4 => ConnectError::NoResources,
                    _ => ConnectError::Other,
                };
                if let Some(flow) = pick(&flows.tcp, input.byte()) {
                    router.handle_tcp_connect_failed(now, flow, error);
                }
            }
            6 => {
                let flow = pick(&flows.tcp, input.byte());
                let byte = input.byte().unwrap_or(0);
                let len = usize::from(byte) * 64;
                if let Some(flow) = flow {
                    if byte % 2 == 0 {
                        router.handle_tcp_data(now, flow, &vec![0x61; len]);
                    } else {
                        // As the driver reads: into the connection's own
                        // buffer, as much of the host's bytes as the room takes.
                        let max = 64 * 1024;
                        router.handle_tcp_read(now, flow, max, |room| {
                            let offered = room.remaining_mut();
                            assert!((1..=max).contains(&offered), "room of {offered} bytes");
                            room.put_bytes(0x61, offered.min(len));
                        });
                    }
                }
            }
            7 => {
                let flow = pick(&flows.tcp, input.byte());
                let what = input.byte().unwrap_or(0);
                if let Some(flow) = flow {
                    match what % 3 {
                        0 => router.handle_tcp_written(now, flow, usize::from(what) * 16),
                        1 => router.handle_tcp_eof(now, flow),
                        _ => router.handle_tcp_error(now, flow),
                    }
                }
            }
            8 => {
                let flow = pick(&flows.udp, input.byte());
                let len = usize::from(input.byte().unwrap_or(0)) * 32;
                let from = SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), 53);
                if let Some(flow) = flow {
                    router.handle_udp_datagram(now, flow, from, &vec![0x62; len]);
                }
            }
            _ => {
                let flow = pick(&flows.icmp, input.byte());
                if let Some(flow) = flow {
                    let from = IpAddr::from(Ipv4Addr::new(192, 0, 2, 7));
                    router.handle_echo_reply(now, flow, from, 1, b"pong");
                }
            }
        }
        flows.drain(&mut router);
        assert_within_limits(&router, &config);
    }
}

/// A cursor over the fuzzer's bytes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    /// A length (two bytes, modulo 2048) and that many bytes.
    fn packet(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.u16()?) % 2048;
        Some(self.take(len))
    }

    /// One of a few endpoint pairs, v4 or v6.
    fn endpoints(&mut self) -> Option<(SocketAddr, SocketAddr)> {
        let b = self.byte()?;
        let port = 1024 + u16::from(b & 3);
        let remote_port = [80, 443, 53, 0][usize::from((b >> 2) & 3)];
        Some(if b & 0x10 == 0 {
            (
                SocketAddr::new(Ipv4Addr::new(10, 0, 2, 15).into(), port),
                SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), remote_port),
            )
        } else {
            (
                SocketAddr::new("fd00::2".parse::<Ipv6Addr>().ok()?.into(), port),
                SocketAddr::new("2001:db8::7".parse::<Ipv6Addr>().ok()?.into(), remote_port),
            )
        })
    }

    /// A well-formed TCP segment with fuzzed fields.
    fn tcp_packet(&mut self) -> Option<bytes::BytesMut> {
        let (from, to) = self.endpoints()?;
        let flags = self.byte()?;
        let seq = self.u32()?;
        let ack = self.u32()?;
        let window = self.u16()?;
        let len = usize::from(self.byte()?) * 8;
        let payload = self.take(len);
        let segment = TcpSegment {
            seq,
            ack: (flags & 1 != 0).then_some(ack),
            syn: flags & 2 != 0,
            fin: flags & 4 != 0,
            rst: flags & 8 != 0,
            window,
            wscale: (flags & 16 != 0).then_some(flags >> 5),
            mss: (flags & 32 != 0).then_some(window),
            payload,
            packet: None,
        };
        packet::build_tcp(from, to, &segment)
    }

    /// A well-formed UDP datagram (to the network or the DNS server).
    fn udp_or_echo_packet(&mut self) -> Option<bytes::BytesMut> {
        let (from, mut to) = self.endpoints()?;
        let kind = self.byte()?;
        let len = usize::from(self.byte()?) * 4;
        let payload = self.take(len);
        if kind & 1 == 1 && to.is_ipv4() {
            to = "10.0.2.1:53".parse().ok()?;
        }
        packet::build_udp(from, to, payload)
    }
}

#[cfg(test)]
mod tests {
    //! Replays the committed corpus through every body: `cargo test` here
    //! checks that the seeds (and any crash reproducers added to them) pass.

    use std::fs;
    use std::path::Path;

    fn replay(target: &str, body: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut n = 0;
        for entry in fs::read_dir(&dir).expect("corpus directory") {
            body(&fs::read(entry.expect("entry").path()).expect("read"));
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", dir.display());
    }

    /// Writes the seed corpus: valid packets of every kind the router
    /// handles, and scripts that open, use and close flows. Run with
    /// `cargo test -- --ignored write_seed_corpus`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        use super::*;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join(format!("seed-{name}")), data).expect("write");
        };
        let framed = |packets: &[&[u8]]| -> Vec<u8> {
            let mut out = Vec::new();
            for p in packets {
                out.extend_from_slice(&(p.len() as u16).to_le_bytes());
                out.extend_from_slice(p);
                out.push(1);
            }
            out
        };
        let v4 = |port| SocketAddr::new(Ipv4Addr::new(10, 0, 2, 15).into(), port);
        let v6 = |port| SocketAddr::new("fd00::2".parse::<Ipv6Addr>().unwrap().into(), port);
        let net4 = SocketAddr::new(Ipv4Addr::new(192, 0, 2, 7).into(), 80);
        let net6 = SocketAddr::new("2001:db8::7".parse::<Ipv6Addr>().unwrap().into(), 80);
        let dns4: SocketAddr = "10.0.2.1:53".parse().unwrap();
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        query.extend_from_slice(b"\x07example\x04test\x00\x00\x01\x00\x01");
        query.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let mut mx = query.clone();
        mx[12 + 14] = 15;
        let syn = |from, to| {
            packet::build_tcp(
                from,
                to,
                &TcpSegment {
                    seq: 1000,
                    syn: true,
                    window: 65535,
                    mss: Some(1360),
                    wscale: Some(7),
                    ..TcpSegment::default()
                },
            )
            .unwrap()
        };
        let udp4 = packet::build_udp(v4(1024), net4, b"hello").unwrap();
        let udp6 = packet::build_udp(v6(1024), net6, b"hello").unwrap();
        let dns_packet = packet::build_udp(v4(1025), dns4, &query).unwrap();
        let syn4 = syn(v4(1026), net4);
        let syn6 = syn(v6(1026), net6);
        let mut zero_len = udp4.to_vec();
        zero_len[2..4].copy_from_slice(&[0, 0]);
        let big4 = packet::build_udp(v4(1027), net4, &[0x5a; 3000]).unwrap();
        let big6 = packet::build_udp(v6(1027), net6, &[0x5a; 3000]).unwrap();
        let mut frags4 = Vec::new();
        libwgslirpy::core::fragment::fragment(&big4, 1280, 9, |f| frags4.push(f.to_vec()));
        let mut frags6 = Vec::new();
        libwgslirpy::core::fragment::fragment(&big6, 1280, 9, |f| frags6.push(f.to_vec()));

        let singles: Vec<(&str, &[u8])> = vec![
            ("udp4", &udp4),
            ("udp6", &udp6),
            ("dns", &dns_packet),
            ("syn4", &syn4),
            ("syn6", &syn6),
            ("total-length-zero", &zero_len),
            ("frag4", &frags4[0]),
            ("frag6", &frags6[0]),
        ];
        for (name, data) in &singles {
            write("packet_parse", name, data);
            write("router_packet", name, data);
        }
        let refs4: Vec<&[u8]> = frags4.iter().map(Vec::as_slice).collect();
        let refs6: Vec<&[u8]> = frags6.iter().map(Vec::as_slice).collect();
        write("reassembler", "v4", &framed(&refs4));
        write("reassembler", "v6", &framed(&refs6));
        let mut interleaved = refs4.clone();
        interleaved.extend(&refs6);
        interleaved.push(refs4[0]);
        write("reassembler", "mixed", &framed(&interleaved));

        let with_answer = |q: &[u8], answer: &[u8]| {
            let mut out = (q.len() as u16).to_le_bytes().to_vec();
            out.extend_from_slice(q);
            out.extend_from_slice(answer);
            out
        };
        let mut upstream = mx.clone();
        upstream[2] |= 0x80;
        write(
            "dns_query",
            "a",
            &with_answer(&query, &[192, 0, 2, 1, 192, 0, 2, 2]),
        );
        write("dns_query", "mx", &with_answer(&mx, &upstream));

        // Scripts: op 0 = raw packet, 1 = built TCP, 2 = built UDP, 3 = time,
        // 4 = connected, 6 = host data, 7 = written/eof/error, 8 = UDP reply.
        let mut script = vec![0u8];
        script.extend_from_slice(&(syn4.len() as u16).to_le_bytes());
        script.extend_from_slice(&syn4);
        script.extend_from_slice(&[4, 0]); // connected
        // The peer's ACK of the SYN-ACK and some data: built TCP, flags ACK.
        script.extend_from_slice(&[1, 0x00, 0x01]);
        script.extend_from_slice(&1001u32.to_le_bytes());
        script.extend_from_slice(&0u32.to_le_bytes());
        script.extend_from_slice(&65535u16.to_le_bytes());
        script.extend_from_slice(&[
            4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
            24, 25, 26, 27, 28, 29, 30, 31, 32,
        ]);
        script.extend_from_slice(&[6, 0, 8, 7, 0, 3, 7, 1, 3, 40, 3, 255]);
        script.extend_from_slice(&[2, 0x00, 0, 16]);
        script.extend_from_slice(&[0x41; 64]);
        script.extend_from_slice(&[8, 0, 4, 2, 0x00, 1, 16]);
        script.extend_from_slice(&[0x42; 64]);
        script.extend_from_slice(&[3, 255, 3, 255]);
        write("router_sequence", "tcp-udp-dns", &script);
        let mut flood = Vec::new();
        for i in 0..64u8 {
            flood.extend_from_slice(&[1, i, 0x02, i, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]);
            flood.extend_from_slice(&[2, i, 0, 0]);
        }
        write("router_sequence", "flood", &flood);
    }

    #[test]
    fn corpus_replays() {
        replay("packet_parse", super::packet_parse);
        replay("reassembler", super::reassembler);
        replay("dns_query", super::dns_query);
        replay("router_packet", super::router_packet);
        replay("router_sequence", super::router_sequence);
    }
}
