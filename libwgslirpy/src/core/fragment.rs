//! IP fragmentation toward the peer, and reassembly of the peer's fragments.
//!
//! A UDP datagram from the network may be larger than the tunnel MTU (up to
//! 65,507 bytes of payload). Rather than drop it, [`fragment`] splits the IP
//! packet that carries it into fragments that each fit the MTU: IPv4
//! fragments (the router is the packet's source, so it may fragment it even
//! with DF set), or for IPv6 a fragment header (RFC 8200 §4.5) after the
//! fixed header. The peer's stack reassembles them.
//!
//! The other way, [`Reassembler`] puts the peer's fragments back together.
//! It holds at most `max_bytes` in all, counting each fragment's payload
//! plus a fixed overhead per fragment and per datagram (so a flood of tiny
//! fragments is bounded too, in memory and in count); when a new fragment
//! would exceed that, the oldest incomplete datagrams are dropped first
//! (counted by the caller, and logged at most once per
//! [`super::limit::LIMIT_LOG_INTERVAL`]). An incomplete datagram is dropped
//! after `timeout`. Overlapping or duplicate fragments drop their whole
//! datagram (RFC 5722), as do fragments that would build a datagram over
//! 65,535 bytes; empty fragments are dropped. Finding the oldest datagram
//! and the next deadline is O(log n). Nothing here allocates more than the
//! bytes it was given.
//!
//! Only packets whose IPv6 fragment header directly follows the fixed header
//! are reassembled; packets with other extension headers before it are
//! reported as not fragments, and the router drops them as unsupported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet};

use super::limit::LimitLog;
use super::packet::TRANSPORT_TAILROOM;

/// Length of the IPv4 header of the packets we build (no options).
const IPV4_HEADER: usize = 20;
/// Length of the IPv6 fixed header.
const IPV6_HEADER: usize = 40;
/// Length of the IPv6 fragment extension header.
const FRAGMENT_HEADER: usize = 8;
/// The largest IP datagram, header included (IPv4), or payload (IPv6).
const MAX_DATAGRAM: usize = 65535;
/// What each held fragment costs against the limit beyond its payload: its
/// allocation and its node in the datagram's map, rounded up.
const PIECE_OVERHEAD: usize = 64;
/// What each incomplete datagram costs against the limit beyond its
/// fragments: its header (at most 60 bytes) and its table entries, rounded up.
const PARTIAL_OVERHEAD: usize = 256;

/// Splits the IP packet `packet`, built by the router (IPv4 without
/// options, or IPv6 with no extension header), into fragments of at most
/// `mtu` bytes, passing each to `emit`. A packet that fits is passed whole.
/// `ident` becomes the fragments' identification.
///
/// Returns false (emitting nothing) if `packet` is not such a packet or
/// `mtu` leaves no room for payload.
pub fn fragment(packet: &[u8], mtu: usize, ident: u32, mut emit: impl FnMut(BytesMut)) -> bool {
    if packet.len() <= mtu {
        emit(BytesMut::from(packet));
        return true;
    }
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= IPV4_HEADER && packet[0] & 0x0f == 5 => {
            fragment_ipv4(packet, mtu, ident as u16, emit)
        }
        Some(6) if packet.len() >= IPV6_HEADER => fragment_ipv6(packet, mtu, ident, emit),
        _ => false,
    }
}

/// Fragment payload sizes must be multiples of 8 bytes, except the last.
fn chunk_len(room: usize) -> Option<usize> {
    let len = room & !7;
    (len > 0).then_some(len)
}

fn fragment_ipv4(packet: &[u8], mtu: usize, ident: u16, mut emit: impl FnMut(BytesMut)) -> bool {
    let Some(chunk) = mtu.checked_sub(IPV4_HEADER).and_then(chunk_len) else {
        return false;
    };
    let (header, payload) = packet.split_at(IPV4_HEADER);
    let mut offset = 0;
    for piece in payload.chunks(chunk) {
        let more = offset + piece.len() < payload.len();
        let mut buf = BytesMut::with_capacity(IPV4_HEADER + piece.len() + TRANSPORT_TAILROOM);
        buf.extend_from_slice(header);
        buf.extend_from_slice(piece);
        let mut view = Ipv4Packet::new_unchecked(&mut buf[..]);
        view.set_total_len((IPV4_HEADER + piece.len()) as u16);
        view.set_ident(ident);
        view.set_dont_frag(false);
        view.set_more_frags(more);
        view.set_frag_offset(offset as u16);
        view.fill_checksum();
        emit(buf);
        offset += piece.len();
    }
    true
}

fn fragment_ipv6(packet: &[u8], mtu: usize, ident: u32, mut emit: impl FnMut(BytesMut)) -> bool {
    let Some(chunk) = mtu
        .checked_sub(IPV6_HEADER + FRAGMENT_HEADER)
        .and_then(chunk_len)
    else {
        return false;
    };
    let (header, payload) = packet.split_at(IPV6_HEADER);
    let next_header = header[6];
    let mut offset = 0;
    for piece in payload.chunks(chunk) {
        let more = offset + piece.len() < payload.len();
        let mut buf = BytesMut::with_capacity(
            IPV6_HEADER + FRAGMENT_HEADER + piece.len() + TRANSPORT_TAILROOM,
        );
        buf.extend_from_slice(header);
        let offset_and_flag = (offset as u16) | u16::from(more);
        buf.extend_from_slice(&[next_header, 0]);
        buf.extend_from_slice(&offset_and_flag.to_be_bytes());
        buf.extend_from_slice(&ident.to_be_bytes());
        buf.extend_from_slice(piece);
        let mut view = Ipv6Packet::new_unchecked(&mut buf[..]);
        view.set_payload_len((FRAGMENT_HEADER + piece.len()) as u16);
        view.set_next_header(IpProtocol::Ipv6Frag);
        emit(buf);
        offset += piece.len();
    }
    true
}

/// What identifies the fragments of one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct DatagramKey {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ident: u32,
}

/// The fragments of one datagram received so far.
struct Partial {
    first_seen: Instant,
    /// The header to rebuild the datagram with (IPv4 header, or IPv6 fixed
    /// header), from the first fragment.
    header: Option<Vec<u8>>,
    /// Fragment payloads by offset.
    pieces: BTreeMap<usize, Vec<u8>>,
    /// The datagram's payload length, once the last fragment is known.
    total: Option<usize>,
    /// Payload bytes held.
    bytes: usize,
    /// What this datagram costs against the limit: payload plus overheads.
    cost: usize,
}

/// What became of a packet given to [`Reassembler::handle`].
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembly {
    /// Not a fragment: use the packet as it is.
    NotFragment,
    /// A fragment, kept until the rest arrive.
    Pending,
    /// The last missing fragment: here is the whole datagram.
    Complete(BytesMut),
    /// A fragment that was dropped (malformed, overlapping, too large, or
    /// no room).
    Dropped,
}

/// Reassembles fragmented IPv4 and IPv6 datagrams within bounded memory.
pub struct Reassembler {
    partials: HashMap<DatagramKey, Partial>,
    /// The incomplete datagrams by age, oldest first.
    by_age: BTreeSet<(Instant, DatagramKey)>,
    max_bytes: usize,
    /// The cost of what is held, overheads included.
    held_bytes: usize,
    timeout: Duration,
    evict_log: LimitLog,
}

impl Reassembler {
    /// A reassembler holding at most `max_bytes` of fragments, each
    /// incomplete datagram for at most `timeout`.
    pub fn new(max_bytes: usize, timeout: Duration) -> Self {
        Reassembler {
            partials: HashMap::new(),
            by_age: BTreeSet::new(),
            max_bytes,
            held_bytes: 0,
            timeout,
            evict_log: LimitLog::default(),
        }
    }

    /// Bytes of fragments held now, overheads included: never more than
    /// `max_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Incomplete datagrams held now.
    pub fn len(&self) -> usize {
        self.partials.len()
    }

    /// Whether no incomplete datagram is held.
    pub fn is_empty(&self) -> bool {
        self.partials.is_empty()
    }

    /// Takes a packet from the peer.
    pub fn handle(&mut self, now: Instant, packet: &[u8]) -> Reassembly {
        let Some(Fragment {
            key,
            header,
            offset,
            more,
            payload,
        }) = parse_fragment(packet)
        else {
            return match is_fragment(packet) {
                true => Reassembly::Dropped,
                false => Reassembly::NotFragment,
            };
        };
        if payload.is_empty()
            || offset + payload.len() > MAX_DATAGRAM
            || (more && payload.len() % 8 != 0)
        {
            self.discard(&key);
            return Reassembly::Dropped;
        }
        // Room for the piece and, if it comes to that, a new datagram.
        if !self.make_room(now, PARTIAL_OVERHEAD + PIECE_OVERHEAD + payload.len()) {
            return Reassembly::Dropped;
        }
        let partial = self.partials.entry(key).or_insert_with(|| {
            self.by_age.insert((now, key));
            self.held_bytes += PARTIAL_OVERHEAD;
            Partial {
                first_seen: now,
                header: None,
                pieces: BTreeMap::new(),
                total: None,
                bytes: 0,
                cost: PARTIAL_OVERHEAD,
            }
        });
        let end = offset + payload.len();
        let overlaps = partial
            .pieces
            .range(..end)
            .next_back()
            .is_some_and(|(&start, piece)| start + piece.len() > offset)
            || partial
                .total
                .is_some_and(|total| end > total || (!more && end != total));
        if overlaps {
            self.discard(&key);
            return Reassembly::Dropped;
        }
        if offset == 0 {
            partial.header = Some(header);
        }
        if !more {
            partial.total = Some(end);
        }
        partial.pieces.insert(offset, payload.to_vec());
        partial.bytes += payload.len();
        partial.cost += PIECE_OVERHEAD + payload.len();
        self.held_bytes += PIECE_OVERHEAD + payload.len();

        let complete =
            partial.total.is_some_and(|total| partial.bytes == total) && partial.header.is_some();
        if !complete {
            return Reassembly::Pending;
        }
        let Some(partial) = self.take(&key) else {
            return Reassembly::Dropped;
        };
        match assemble(partial) {
            Some(datagram) => Reassembly::Complete(datagram),
            None => Reassembly::Dropped,
        }
    }

    /// Drops incomplete datagrams older than the timeout.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(first_seen, key)) = self.by_age.first() {
            if first_seen + self.timeout > now {
                break;
            }
            self.discard(&key);
        }
    }

    /// When the oldest incomplete datagram times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_age
            .first()
            .map(|&(first_seen, _)| first_seen + self.timeout)
    }

    /// Removes the datagram `key`, returning it.
    fn take(&mut self, key: &DatagramKey) -> Option<Partial> {
        let partial = self.partials.remove(key)?;
        self.by_age.remove(&(partial.first_seen, *key));
        self.held_bytes -= partial.cost;
        Some(partial)
    }

    fn discard(&mut self, key: &DatagramKey) {
        self.take(key);
    }

    /// Drops the oldest incomplete datagrams until `cost` more fits.
    fn make_room(&mut self, now: Instant, cost: usize) -> bool {
        if cost > self.max_bytes {
            return false;
        }
        let mut evicted = false;
        while self.held_bytes + cost > self.max_bytes {
            let Some(&(_, oldest)) = self.by_age.first() else {
                break;
            };
            self.discard(&oldest);
            evicted = true;
        }
        if evicted && let Some(hits) = self.evict_log.hit(now) {
            tracing::warn!(
                hits,
                "--max-reassembly-bytes reached: oldest incomplete datagrams dropped"
            );
        }
        true
    }
}

/// Whether `packet` claims to be a fragment, well-formed or not.
fn is_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            Ipv4Packet::new_checked(packet).is_ok_and(|p| p.more_frags() || p.frag_offset() != 0)
        }
        Some(6) => packet.len() >= IPV6_HEADER && packet[6] == u8::from(IpProtocol::Ipv6Frag),
        _ => false,
    }
}

/// A well-formed fragment.
struct Fragment<'a> {
    key: DatagramKey,
    /// The header to rebuild the datagram with.
    header: Vec<u8>,
    /// Where the payload goes in the datagram, in bytes.
    offset: usize,
    /// Whether more fragments follow.
    more: bool,
    payload: &'a [u8],
}

fn parse_fragment(packet: &[u8]) -> Option<Fragment<'_>> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let view = Ipv4Packet::new_checked(packet).ok()?;
            if !view.verify_checksum() || !(view.more_frags() || view.frag_offset() != 0) {
                return None;
            }
            let header_len = usize::from(view.header_len());
            let key = DatagramKey {
                src: view.src_addr().into(),
                dst: view.dst_addr().into(),
                protocol: view.next_header().into(),
                ident: view.ident().into(),
            };
            let header = packet[..header_len].to_vec();
            let payload = &packet[header_len..usize::from(view.total_len())];
            Some(Fragment {
                key,
                header,
                offset: usize::from(view.frag_offset()),
                more: view.more_frags(),
                payload,
            })
        }
        Some(6) => {
            let view = Ipv6Packet::new_checked(packet).ok()?;
            if view.next_header() != IpProtocol::Ipv6Frag {
                return None;
            }
            let body = &packet[IPV6_HEADER..IPV6_HEADER + usize::from(view.payload_len())];
            let fragment_header = body.get(..FRAGMENT_HEADER)?;
            let offset_and_flag = u16::from_be_bytes([fragment_header[2], fragment_header[3]]);
            let key = DatagramKey {
                src: view.src_addr().into(),
                dst: view.dst_addr().into(),
                protocol: fragment_header[0],
                ident: u32::from_be_bytes(fragment_header[4..8].try_into().ok()?),
            };
            let mut header = packet[..IPV6_HEADER].to_vec();
            header[6] = fragment_header[0];
            let offset = usize::from(offset_and_flag & !7);
            Some(Fragment {
                key,
                header,
                offset,
                more: offset_and_flag & 1 == 1,
                payload: &body[FRAGMENT_HEADER..],
            })
        }
        _ => None,
    }
}

/// Joins the pieces of a complete datagram under its header, with lengths
/// (and the IPv4 checksum) fixed.
fn assemble(partial: Partial) -> Option<BytesMut> {
    let header = partial.header?;
    let total = partial.total?;
    let mut buf = BytesMut::with_capacity(header.len() + total);
    buf.extend_from_slice(&header);
    for piece in partial.pieces.values() {
        buf.extend_from_slice(piece);
    }
    if header[0] >> 4 == 4 {
        let len = u16::try_from(buf.len()).ok()?;
        let mut view = Ipv4Packet::new_unchecked(&mut buf[..]);
        view.set_total_len(len);
        view.set_more_frags(false);
        view.set_frag_offset(0);
        view.fill_checksum();
    } else {
        let mut view = Ipv6Packet::new_unchecked(&mut buf[..]);
        view.set_payload_len(u16::try_from(total).ok()?);
    }
    Some(buf)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::core::packet::{self, Parsed};

    fn big_udp(src: &str, dst: &str, len: usize) -> (BytesMut, Vec<u8>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let src: SocketAddr = src.parse().unwrap();
        let dst: SocketAddr = dst.parse().unwrap();
        (packet::build_udp(src, dst, &payload).unwrap(), payload)
    }

    fn fragments(packet: &[u8], mtu: usize) -> Vec<BytesMut> {
        let mut out = Vec::new();
        assert!(fragment(packet, mtu, 0x1234, |f| out.push(f)));
        out
    }

    #[test]
    fn small_packets_pass_whole() {
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 100);
        assert_eq!(fragments(&packet, 1420), vec![packet]);
    }

    #[test]
    fn largest_udp_round_trips_through_fragments_v4_and_v6() {
        for (src, dst, max) in [
            ("10.0.0.1:53", "10.0.0.2:4000", 65507),
            ("[fd00::1]:53", "[fd00::2]:4000", 65527),
        ] {
            let (packet, payload) = big_udp(src, dst, max);
            let pieces = fragments(&packet, 1420);
            assert!(pieces.len() > 40);
            assert!(pieces.iter().all(|p| p.len() <= 1420));
            let mut reassembler = Reassembler::new(1 << 20, Duration::from_secs(30));
            let now = Instant::now();
            // Deliver out of order: last first.
            let (last, rest) = pieces.split_last().unwrap();
            assert_eq!(reassembler.handle(now, last), Reassembly::Pending);
            for piece in &rest[..rest.len() - 1] {
                assert_eq!(reassembler.handle(now, piece), Reassembly::Pending);
            }
            let Reassembly::Complete(whole) = reassembler.handle(now, &rest[rest.len() - 1]) else {
                panic!("not complete");
            };
            let Ok(Parsed::Udp { payload: got, .. }) = packet::parse(&whole) else {
                panic!("reassembled packet does not parse as UDP");
            };
            assert_eq!(got, &payload[..]);
            assert_eq!(reassembler.held_bytes(), 0);
        }
    }

    #[test]
    fn non_fragments_are_left_alone() {
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 10);
        let mut reassembler = Reassembler::new(1 << 16, Duration::from_secs(30));
        assert_eq!(
            reassembler.handle(Instant::now(), &packet),
            Reassembly::NotFragment
        );
    }

    #[test]
    fn overlapping_fragments_drop_the_datagram() {
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 3000);
        let pieces = fragments(&packet, 1420);
        let mut reassembler = Reassembler::new(1 << 16, Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(reassembler.handle(now, &pieces[0]), Reassembly::Pending);
        assert_eq!(reassembler.handle(now, &pieces[0]), Reassembly::Dropped);
        assert_eq!(reassembler.held_bytes(), 0);
    }

    #[test]
    fn memory_is_bounded_and_oldest_goes_first() {
        let mut reassembler = Reassembler::new(4000, Duration::from_secs(30));
        let t0 = Instant::now();
        for (i, port) in [1u16, 2, 3, 4].into_iter().enumerate() {
            let (packet, _) = big_udp(&format!("10.0.0.1:{port}"), "10.0.0.2:2", 3000);
            let mut pieces = Vec::new();
            fragment(&packet, 1420, u32::from(port), |f| pieces.push(f));
            let now = t0 + Duration::from_secs(i as u64);
            assert_eq!(reassembler.handle(now, &pieces[0]), Reassembly::Pending);
            assert!(reassembler.held_bytes() <= 4000);
        }
        // Only the newest two first fragments (1400 bytes each, plus overheads) fit.
        assert_eq!(
            reassembler.held_bytes(),
            2 * (1400 + PIECE_OVERHEAD + PARTIAL_OVERHEAD)
        );
        assert_eq!(reassembler.len(), 2);
    }

    /// Tiny fragments, each its own datagram, cost their overhead: a flood of
    /// them is bounded in count, not only in payload bytes.
    #[test]
    fn tiny_fragment_flood_is_bounded_in_count() {
        let max = 1 << 16;
        let mut reassembler = Reassembler::new(max, Duration::from_secs(30));
        let t0 = Instant::now();
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 1);
        for ident in 0..20_000u16 {
            let mut piece = packet.to_vec();
            let mut view = Ipv4Packet::new_unchecked(&mut piece[..]);
            view.set_ident(ident);
            view.set_frag_offset(8);
            view.fill_checksum();
            let now = t0 + Duration::from_millis(u64::from(ident));
            assert_eq!(reassembler.handle(now, &piece), Reassembly::Pending);
            assert!(reassembler.held_bytes() <= max);
        }
        assert!(reassembler.len() <= max / (PARTIAL_OVERHEAD + PIECE_OVERHEAD));
        // The newest are kept, and expire on time.
        assert_eq!(
            reassembler.next_expiry(),
            Some(
                t0 + Duration::from_millis(20_000 - reassembler.len() as u64)
                    + Duration::from_secs(30)
            )
        );
        reassembler.expire(t0 + Duration::from_secs(60));
        assert!(reassembler.is_empty());
        assert_eq!(reassembler.held_bytes(), 0);
    }

    #[test]
    fn empty_fragments_are_dropped() {
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 0);
        let mut piece = packet.to_vec();
        piece.truncate(20);
        let mut view = Ipv4Packet::new_unchecked(&mut piece[..]);
        view.set_total_len(20);
        view.set_frag_offset(8);
        view.fill_checksum();
        let mut reassembler = Reassembler::new(1 << 16, Duration::from_secs(30));
        assert_eq!(
            reassembler.handle(Instant::now(), &piece),
            Reassembly::Dropped
        );
        assert!(reassembler.is_empty());
    }

    #[test]
    fn incomplete_datagrams_expire() {
        let (packet, _) = big_udp("[fd00::1]:1", "[fd00::2]:2", 3000);
        let pieces = fragments(&packet, 1420);
        let timeout = Duration::from_secs(30);
        let mut reassembler = Reassembler::new(1 << 16, timeout);
        let t0 = Instant::now();
        reassembler.handle(t0, &pieces[0]);
        assert_eq!(reassembler.next_expiry(), Some(t0 + timeout));
        reassembler.expire(t0 + timeout);
        assert_eq!(reassembler.held_bytes(), 0);
        assert_eq!(reassembler.next_expiry(), None);
    }

    #[test]
    fn oversized_datagram_is_dropped() {
        let (packet, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 3000);
        let mut piece = fragments(&packet, 1420)[1].to_vec();
        let mut view = Ipv4Packet::new_unchecked(&mut piece[..]);
        view.set_frag_offset(65528);
        view.fill_checksum();
        let mut reassembler = Reassembler::new(1 << 16, Duration::from_secs(30));
        assert_eq!(
            reassembler.handle(Instant::now(), &piece),
            Reassembly::Dropped
        );
    }

    #[test]
    fn truncated_fragments_never_panic() {
        let (packet, _) = big_udp("[fd00::1]:1", "[fd00::2]:2", 3000);
        let (packet4, _) = big_udp("10.0.0.1:1", "10.0.0.2:2", 3000);
        let mut reassembler = Reassembler::new(1 << 16, Duration::from_secs(30));
        for piece in fragments(&packet, 1420)
            .iter()
            .chain(&fragments(&packet4, 1420))
        {
            for len in 0..piece.len() {
                reassembler.handle(Instant::now(), &piece[..len]);
            }
        }
    }
}
