//! Peers: who owns a packet, and what each peer has sent and received.
//!
//! # Theory of operation
//!
//! **Attribution.** The tunnel hands the router plain IP packets with no peer
//! tag. It does not need one: WireGuard has already checked that a packet's
//! inner source lies within the sending peer's allowed IPs (cryptokey
//! routing), so the longest allowed-IPs prefix that contains the source names
//! the sender, exactly as the longest one that contains a destination names
//! the peer a packet for the tunnel goes to. [`Peers::lookup`] does that
//! match. When two peers list the same prefix, the later one in the list
//! owns it, as `wg` gives the route to the peer configured last.
//!
//! **Cost.** The match must not allocate and must be cheap per packet. With
//! one peer (the plain command line, raw IP mode) every address is that
//! peer's: no lookup at all. With several, the prefixes are grouped by length,
//! longest first, one hash map per length from the masked network address to
//! the peer: a lookup is one hash probe per distinct prefix length of the
//! address's family (two for the usual `/32` plus `/128` per peer).
//!
//! **Identity.** Each peer gets a [`PeerId`] that is never reused within a
//! router; the flow tables count and evict per `PeerId` (see
//! [`super::flows`]). [`Peers::replace`] keeps the id and the counters of a
//! peer whose public key is in both the old and the new list, so a reload
//! disturbs no one it does not remove.
//!
//! **Counters.** Inner packets and bytes from and to each peer, counted as
//! they enter the router and as they leave it for the tunnel
//! ([`PeerCounters`]).
//!
//! **Out of scope.** Allowed IPs change only through [`Peers::replace`];
//! the router does not learn routes from traffic.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::config::{Key, PeerConfig};

/// Names one peer within a router. Never reused, so flows of a peer that
/// was removed and added again do not mix with the new peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// What one peer has sent and received, as inner IP packets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets from the peer (fragments counted one by one).
    pub packets_from: u64,
    /// Bytes of those packets, IP headers included.
    pub bytes_from: u64,
    /// Packets handed to the tunnel for the peer.
    pub packets_to: u64,
    /// Bytes of those packets, IP headers included.
    pub bytes_to: u64,
}

impl PeerCounters {
    /// Adds `other`'s counts to these, for the shards of one gateway.
    pub fn add(&mut self, other: &PeerCounters) {
        add_each_field!(
            self,
            other,
            PeerCounters {
                packets_from,
                bytes_from,
                packets_to,
                bytes_to
            }
        );
    }
}

/// One peer as the router sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its id.
    pub id: PeerId,
    /// Its public key; `None` for the one peer of raw IP mode.
    pub public_key: Option<Key>,
    /// Its counters.
    pub counters: PeerCounters,
}

/// Prefixes of one address family, longest first: (length, masked network
/// address to the index of the peer in [`Peers::list`]).
#[derive(Debug, Default)]
struct Lpm {
    by_len: Vec<(u8, HashMap<u128, usize>)>,
}

impl Lpm {
    /// `bits` is the family's address width (32 or 128); `addr` is the
    /// address as a number, right-aligned.
    fn insert(&mut self, bits: u8, addr: u128, len: u8, peer: usize) {
        let key = mask(bits, addr, len);
        let at = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_len[i].0 == len => i,
            Some(i) => {
                self.by_len.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                self.by_len.push((len, HashMap::new()));
                self.by_len.len() - 1
            }
        };
        self.by_len[at].1.insert(key, peer);
    }

    fn lookup(&self, bits: u8, addr: u128) -> Option<usize> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(bits, addr, *len)).copied())
    }
}

/// `addr` with all but its first `len` of `bits` bits cleared.
fn mask(bits: u8, addr: u128, len: u8) -> u128 {
    let len = len.min(bits);
    if len == 0 {
        return 0;
    }
    let keep = u32::from(bits - len);
    let width_mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    (width_mask >> keep << keep) & addr
}

/// The peers and their allowed IPs.
#[derive(Debug)]
pub struct Peers {
    list: Vec<Peer>,
    v4: Lpm,
    v6: Lpm,
    next_id: u32,
}

impl Peers {
    /// One peer that owns every address: raw IP mode, or an embedder that
    /// has no peer list.
    pub fn single() -> Self {
        let mut peers = Peers {
            list: Vec::new(),
            v4: Lpm::default(),
            v6: Lpm::default(),
            next_id: 0,
        };
        let id = peers.fresh_id();
        peers.list.push(Peer {
            id,
            public_key: None,
            counters: PeerCounters::default(),
        });
        peers
    }

    /// The peers of `configs`, in order.
    pub fn new(configs: &[PeerConfig]) -> Self {
        let mut peers = Peers {
            list: Vec::new(),
            v4: Lpm::default(),
            v6: Lpm::default(),
            next_id: 0,
        };
        peers.replace(configs);
        peers
    }

    fn fresh_id(&mut self) -> PeerId {
        let id = PeerId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Replaces the list with `configs`. A peer whose public key was there
    /// before keeps its id and counters. Returns the ids of the peers that
    /// are gone.
    pub fn replace(&mut self, configs: &[PeerConfig]) -> Vec<PeerId> {
        let mut old = std::mem::take(&mut self.list);
        let mut list = Vec::with_capacity(configs.len());
        for config in configs {
            let key = Some(config.public_key);
            // A key listed twice is one peer: the later entry's allowed IPs
            // are added to the first's.
            if list.iter().any(|p: &Peer| p.public_key == key) {
                continue;
            }
            let peer = match old.iter().position(|p| p.public_key == key) {
                Some(i) => old.swap_remove(i),
                None => Peer {
                    id: self.fresh_id(),
                    public_key: key,
                    counters: PeerCounters::default(),
                },
            };
            list.push(peer);
        }
        self.v4 = Lpm::default();
        self.v6 = Lpm::default();
        for config in configs {
            let Some(index) = list
                .iter()
                .position(|p| p.public_key == Some(config.public_key))
            else {
                continue;
            };
            for net in &config.allowed_ips {
                match net {
                    IpNetwork::V4(n) => {
                        self.v4
                            .insert(32, u128::from(u32::from(n.ip())), n.prefix(), index)
                    }
                    IpNetwork::V6(n) => self.v6.insert(128, u128::from(n.ip()), n.prefix(), index),
                }
            }
        }
        self.list = list;
        old.into_iter().map(|p| p.id).collect()
    }

    /// The peer that owns `addr`: the one whose allowed IPs hold the longest
    /// prefix containing it. With one peer, that peer, whatever `addr` is.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        if self.list.len() == 1 {
            return Some(0);
        }
        match addr {
            IpAddr::V4(a) => self.v4.lookup(32, u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.lookup(128, u128::from(a)),
        }
    }

    /// The id of the peer that owns `addr` (see [`Peers::lookup`]).
    pub fn owner(&self, addr: IpAddr) -> Option<PeerId> {
        self.lookup(addr).map(|i| self.list[i].id)
    }

    /// The peer at `index`, from [`Peers::lookup`].
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Peer> {
        self.list.get_mut(index)
    }

    /// Every peer, in configuration order.
    pub fn list(&self) -> &[Peer] {
        &self.list
    }

    /// The number of peers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no peers (every packet is then dropped).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// The source address of an IPv4 or IPv6 packet, read from the fixed header
/// without any other check, or `None` if it is too short to hold one.
pub fn source_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The destination address of an IPv4 or IPv6 packet (see [`source_of`]).
pub fn destination_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: u8, allowed: &[&str]) -> PeerConfig {
        PeerConfig::new(
            Key([key; 32]),
            allowed.iter().map(|a| a.parse().unwrap()).collect(),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_with_overlapping_allowed_ips() {
        let peers = Peers::new(&[
            peer(1, &["10.0.0.0/8", "fd00::/16"]),
            peer(2, &["10.0.2.0/24"]),
            peer(3, &["10.0.2.15/32", "fd00::15/128", "0.0.0.0/0"]),
        ]);
        assert_eq!(peers.lookup(ip("10.0.2.15")), Some(2));
        assert_eq!(peers.lookup(ip("10.0.2.16")), Some(1));
        assert_eq!(peers.lookup(ip("10.9.9.9")), Some(0));
        assert_eq!(peers.lookup(ip("192.0.2.1")), Some(2));
        assert_eq!(peers.lookup(ip("fd00::15")), Some(2));
        assert_eq!(peers.lookup(ip("fd00::16")), Some(0));
        assert_eq!(peers.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn the_same_prefix_goes_to_the_later_peer() {
        let peers = Peers::new(&[peer(1, &["10.0.2.0/24"]), peer(2, &["10.0.2.0/24"])]);
        assert_eq!(peers.lookup(ip("10.0.2.7")), Some(1));
    }

    #[test]
    fn one_peer_owns_everything() {
        let peers = Peers::new(&[peer(1, &["10.0.2.15/32"])]);
        assert_eq!(peers.lookup(ip("192.0.2.1")), Some(0));
        assert_eq!(Peers::single().lookup(ip("::1")), Some(0));
        assert_eq!(Peers::new(&[]).lookup(ip("10.0.2.15")), None);
    }

    #[test]
    fn replace_keeps_ids_of_kept_keys_and_reports_removed() {
        let mut peers = Peers::new(&[peer(1, &["10.0.0.1/32"]), peer(2, &["10.0.0.2/32"])]);
        let (a, b) = (peers.list()[0].id, peers.list()[1].id);
        peers.get_mut(0).unwrap().counters.packets_from = 5;
        let removed = peers.replace(&[peer(3, &["10.0.0.2/32"]), peer(1, &["10.0.0.1/32"])]);
        assert_eq!(removed, vec![b]);
        assert_eq!(peers.list()[1].id, a);
        assert_eq!(peers.list()[1].counters.packets_from, 5);
        assert_ne!(peers.list()[0].id, b);
        assert_eq!(peers.owner(ip("10.0.0.2")), Some(peers.list()[0].id));
    }

    #[test]
    fn masks() {
        assert_eq!(mask(32, 0x0a00_020f, 24), 0x0a00_0200);
        assert_eq!(mask(32, 0x0a00_020f, 0), 0);
        assert_eq!(mask(32, 0x0a00_020f, 32), 0x0a00_020f);
        assert_eq!(mask(128, u128::MAX, 1), 1 << 127);
    }

    #[test]
    fn addresses_from_headers() {
        let v4 = [
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15, 1, 2, 3, 4,
        ];
        assert_eq!(source_of(&v4), Some(ip("10.0.2.15")));
        assert_eq!(destination_of(&v4), Some(ip("1.2.3.4")));
        assert_eq!(source_of(&v4[..15]), None);
        assert_eq!(source_of(&[]), None);
        assert_eq!(source_of(&[0x00; 40]), None);
    }
}
