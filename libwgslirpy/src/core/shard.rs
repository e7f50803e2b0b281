//! Sharding: which of several routers owns a packet's flow.
//!
//! # Theory of operation
//!
//! With `shards` > 1 the gateway runs that many [`Router`](super::Router)s,
//! each on its own task with its own host sockets, so that flows are served
//! on several worker threads at once with no lock between them. Every
//! packet from the tunnel goes to the router that owns its flow, chosen by
//! a hash of the peer-side endpoint, the one thing every kind of flow is
//! keyed by:
//! - TCP and UDP: the peer's source address and port. UDP's NAT is
//!   endpoint-independent (keyed by that endpoint alone), and a reverse
//!   forward's packets come from its DEST, so a forward's sessions and
//!   connections all live on the shard of DEST ([`Shards::of_endpoint`]),
//!   where the driver hands its HOST-side events;
//! - ICMP echo: the source address and the echo identifier;
//! - anything else: the source address.
//!
//! A fragment carries no ports, so it goes by its source address and IP
//! identification, and its whole datagram, once reassembled there, is
//! handed on to the shard that owns it ([`Router::poll_reroute`](super::Router::poll_reroute)).
//!
//! The limits of [`Config`] are split evenly over the shards
//! ([`Shards::config_for_each`]): each shard holds at most its share of a
//! peer's flows, the limit divided by the number of shards and rounded up,
//! so the totals stay within the limit rounded up to a multiple of the
//! shard count, and a peer may be refused (or lose its oldest flow) on one
//! shard a little before it reaches its limit in all.

use std::net::{IpAddr, SocketAddr};

use crate::Config;

/// IPv6's fragment extension header.
const IPV6_FRAGMENT: u8 = 44;
/// IP protocol numbers of the packets keyed by port or identifier.
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// Echo request types of ICMP and ICMPv6.
const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REQUEST_V6: u8 = 128;

/// How many shards there are, and which one owns what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shards {
    count: usize,
}

impl Default for Shards {
    /// One shard: everything in one router.
    fn default() -> Self {
        Shards { count: 1 }
    }
}

impl Shards {
    /// `count` shards (at least one).
    pub const fn new(count: usize) -> Self {
        Shards {
            count: if count == 0 { 1 } else { count },
        }
    }

    /// How many shards there are.
    pub fn count(self) -> usize {
        self.count
    }

    /// The shard that owns the flow of `packet`, a packet from a peer. A
    /// packet too short to read is shard 0's, to be dropped there.
    pub fn of_packet(self, packet: &[u8]) -> usize {
        if self.count == 1 {
            return 0;
        }
        match flow_key(packet) {
            Some((src, value)) => self.index(src, value),
            None => 0,
        }
    }

    /// The shard that owns the flows whose peer-side endpoint is `endpoint`:
    /// that of every packet a peer sends from it, and of a reverse forward
    /// to it.
    pub fn of_endpoint(self, endpoint: SocketAddr) -> usize {
        if self.count == 1 {
            return 0;
        }
        self.index(endpoint.ip().to_canonical(), endpoint.port())
    }

    /// The configuration each shard's router runs with: `config` with every
    /// limit that bounds a router's tables divided by the number of shards,
    /// rounded up.
    pub fn config_for_each(self, config: &Config) -> Config {
        let share = |limit: usize| limit.div_ceil(self.count);
        let mut each = config.clone();
        each.max_udp_flows = share(config.max_udp_flows);
        each.max_tcp_connections = share(config.max_tcp_connections);
        each.max_tcp_pending_connects = share(config.max_tcp_pending_connects);
        each.max_icmp_ids = share(config.max_icmp_ids);
        each.max_dns_queries = share(config.max_dns_queries);
        each.max_reassembly_bytes = share(config.max_reassembly_bytes);
        each.transmit_queue_capacity = share(config.transmit_queue_capacity);
        each
    }

    /// A multiplicative hash of the source and a 16-bit value, scaled onto
    /// the shards.
    fn index(self, src: IpAddr, value: u16) -> usize {
        let mut hash = u64::from(value);
        let mut mix = |bytes: &[u8]| {
            for chunk in bytes.chunks(8) {
                let mut word = [0; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                hash = (hash ^ u64::from_le_bytes(word)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
        };
        match src {
            IpAddr::V4(v4) => mix(&v4.octets()),
            IpAddr::V6(v6) => mix(&v6.octets()),
        }
        hash = (hash ^ (hash >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((u128::from(hash >> 32) * self.count as u128) >> 32) as usize
    }
}

/// The source address and the 16-bit value that key `packet`'s flow: its
/// source port, echo identifier or, for a fragment, IP identification.
fn flow_key(packet: &[u8]) -> Option<(IpAddr, u16)> {
    let u16_at = |at: usize| {
        packet
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match packet.first()? >> 4 {
        4 => {
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let src = IpAddr::from(src);
            let header = usize::from(packet[0] & 0x0f) * 4;
            let flags_offset = u16_at(6)?;
            let value = if flags_offset & 0x3fff != 0 {
                u16_at(4)?
            } else {
                match *packet.get(9)? {
                    TCP | UDP => u16_at(header).unwrap_or(0),
                    ICMP if packet.get(header) == Some(&ECHO_REQUEST_V4) => {
                        u16_at(header + 4).unwrap_or(0)
                    }
                    _ => 0,
                }
            };
            Some((src, value))
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let src = IpAddr::from(src);
            let value = match *packet.get(6)? {
                TCP | UDP => u16_at(40).unwrap_or(0),
                ICMPV6 if packet.get(40) == Some(&ECHO_REQUEST_V6) => u16_at(44).unwrap_or(0),
                // The low half of the fragment's identification.
                IPV6_FRAGMENT => u16_at(46).unwrap_or(0),
                _ => 0,
            };
            Some((src, value))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hostile_tests::echo_request;
    use crate::core::packet;

    fn endpoint(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[test]
    fn one_shard_owns_everything() {
        let shards = Shards::default();
        let udp =
            packet::build_udp(endpoint("10.0.0.2", 4000), endpoint("192.0.2.1", 53), b"x").unwrap();
        assert_eq!(shards.of_packet(&udp), 0);
        assert_eq!(shards.of_packet(&[]), 0);
        assert_eq!(shards.of_endpoint(endpoint("10.0.0.2", 4000)), 0);
    }

    #[test]
    fn a_packet_goes_to_the_shard_of_its_source_endpoint_whatever_the_destination() {
        let shards = Shards::new(4);
        for (src, dst) in [
            (endpoint("10.0.0.2", 40000), endpoint("192.0.2.1", 80)),
            (endpoint("fd00::2", 40001), endpoint("2001:db8::1", 443)),
        ] {
            let owner = shards.of_endpoint(src);
            let udp = packet::build_udp(src, dst, b"payload").unwrap();
            assert_eq!(shards.of_packet(&udp), owner, "UDP from {src}");
            let other_dst = SocketAddr::new(dst.ip(), 9);
            let udp = packet::build_udp(src, other_dst, b"payload").unwrap();
            assert_eq!(shards.of_packet(&udp), owner, "UDP from {src} elsewhere");
            let segment = packet::TcpSegment {
                seq: 1,
                syn: true,
                ..packet::TcpSegment::default()
            };
            let tcp = packet::build_tcp(src, dst, &segment).unwrap();
            assert_eq!(shards.of_packet(&tcp), owner, "TCP from {src}");
        }
    }

    #[test]
    fn echo_requests_go_by_source_and_identifier() {
        let shards = Shards::new(4);
        for (src, dst, ident) in [
            ("10.0.0.2", "192.0.2.1", 777),
            ("fd00::2", "2001:db8::1", 778),
        ] {
            let src: IpAddr = src.parse().unwrap();
            let request = echo_request(src, dst.parse().unwrap(), ident);
            let owner = shards.of_endpoint(SocketAddr::new(src, ident));
            assert_eq!(shards.of_packet(&request), owner, "echo from {src}");
        }
    }

    #[test]
    fn flows_spread_over_every_shard() {
        let shards = Shards::new(2);
        let mut counts = [0usize; 2];
        for port in 40000..41000 {
            counts[shards.of_endpoint(endpoint("10.0.0.2", port))] += 1;
        }
        assert!(counts.iter().all(|&n| n > 400), "{counts:?}");
    }

    #[test]
    fn each_shard_gets_its_share_of_the_limits_rounded_up() {
        let mut config = Config::new(
            crate::config::Transport::RawIp {
                peer_endpoint: None,
            },
            endpoint("127.0.0.1", 0),
        );
        config.max_udp_flows = 5;
        config.max_tcp_connections = 1;
        let each = Shards::new(2).config_for_each(&config);
        assert_eq!(each.max_udp_flows, 3);
        assert_eq!(each.max_tcp_connections, 1);
        assert_eq!(each.transmit_queue_capacity, 128);
        assert_eq!(Shards::new(1).config_for_each(&config).max_udp_flows, 5);
    }
}
