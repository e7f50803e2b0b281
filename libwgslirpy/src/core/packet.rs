//! Parsing and building IP packets, on top of `smoltcp::wire`.
//!
//! Every packet from a peer goes through [`parse`] once: the IP header is
//! checked (version, lengths, IPv4 header checksum) and the transport header
//! that the router acts on is checked too (lengths and checksum). Anything
//! that fails is a [`Drop`] reason, never a panic: smoltcp's checked views
//! guarantee that no accessor panics after `new_checked`.
//!
//! The builders emit complete packets, checksums included, into a fresh
//! buffer of exactly the right size.
//!
//! Not handled here yet: IP fragments and IPv6 extension headers are
//! reported as [`Drop::Unsupported`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut as _, Bytes, BytesMut};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable,
    Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// The hop limit of packets that the router originates.
pub const HOP_LIMIT: u8 = 64;

/// A packet from a peer, parsed far enough for the router to act on it.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A UDP datagram.
    Udp {
        /// The peer-side endpoint.
        src: SocketAddr,
        /// Where the peer sent it.
        dst: SocketAddr,
        /// The datagram's payload.
        payload: &'a [u8],
    },
    /// A TCP segment, checksum verified.
    Tcp {
        /// The peer-side endpoint.
        src: SocketAddr,
        /// Where the peer sent it.
        dst: SocketAddr,
        /// The segment's header fields and payload.
        segment: TcpSegment<'a>,
    },
    /// An ICMP or ICMPv6 echo request.
    EchoRequest {
        /// The peer's address.
        src: IpAddr,
        /// The address pinged.
        dst: IpAddr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq_no: u16,
        /// Echo payload, returned unchanged in the reply.
        data: &'a [u8],
    },
    /// A well-formed packet of a protocol (or ICMP message) that the router
    /// does not handle.
    Other {
        /// The IP protocol number.
        protocol: u8,
    },
}

/// The parts of a TCP segment that the router acts on, received or to be
/// sent. Flags that TCP has no use for here (PSH, URG) are not kept;
/// options other than MSS and window scale are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpSegment<'a> {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number, when the ACK flag is set.
    pub ack: Option<u32>,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Window field, unscaled.
    pub window: u16,
    /// Window scale option (SYN segments only).
    pub wscale: Option<u8>,
    /// Maximum segment size option (SYN segments only).
    pub mss: Option<u16>,
    /// Payload.
    pub payload: &'a [u8],
    /// The received packet the payload lies in, when the router owns it:
    /// bytes kept from the payload are then views of it ([`share`]).
    pub packet: Option<&'a Bytes>,
}

impl TcpSegment<'_> {
    /// Sequence space taken: payload plus one each for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        // A payload never exceeds 65535 bytes: it came from (or goes into) one IP packet.
        self.payload.len() as u32 + u32::from(self.syn) + u32::from(self.fin)
    }
}

/// Parts of a received packet smaller than this are copied by [`share`]: a
/// view keeps the whole packet, headers included, alive while it waits, which
/// for a few bytes (a peer sending tiny segments) would cost more than a copy.
pub const MIN_SHARED: usize = 512;

/// `part`, bytes of a received packet, as owned [`Bytes`]: a view of
/// `packet` when `part` lies within it and is at least [`MIN_SHARED`] bytes
/// (no copy, no allocation of its size), else a copy.
pub fn share(packet: Option<&Bytes>, part: &[u8]) -> Bytes {
    if let Some(packet) = packet
        && part.len() >= MIN_SHARED
    {
        // Outside `packet`, `start` wraps to a huge offset and fails the check.
        let start = (part.as_ptr() as usize).wrapping_sub(packet.as_ptr() as usize);
        if start
            .checked_add(part.len())
            .is_some_and(|end| end <= packet.len())
        {
            return packet.slice(start..start + part.len());
        }
    }
    Bytes::copy_from_slice(part)
}

/// Why a packet was dropped at parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Too short, inconsistent lengths, bad checksum, unknown version.
    Malformed,
    /// Well-formed, but uses something not handled (fragments, extension
    /// headers).
    Unsupported,
}

/// Parses a packet from a peer.
pub fn parse(packet: &[u8]) -> Result<Parsed<'_>, Drop> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => parse_ipv4(packet),
        Some(6) => parse_ipv6(packet),
        _ => Err(Drop::Malformed),
    }
}

fn parse_ipv4(bytes: &[u8]) -> Result<Parsed<'_>, Drop> {
    let packet = Ipv4Packet::new_checked(bytes).map_err(|_| Drop::Malformed)?;
    if packet.more_frags() || packet.frag_offset() != 0 {
        return Err(Drop::Unsupported);
    }
    let ip =
        Ipv4Repr::parse(&packet, &ChecksumCapabilities::default()).map_err(|_| Drop::Malformed)?;
    let (src, dst) = (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
    let payload = packet.payload();
    match ip.next_header {
        IpProtocol::Udp => parse_udp(src, dst, payload),
        IpProtocol::Tcp => parse_tcp(src, dst, payload),
        IpProtocol::Icmp => {
            let icmp = Icmpv4Packet::new_checked(payload).map_err(|_| Drop::Malformed)?;
            if !icmp.verify_checksum() {
                return Err(Drop::Malformed);
            }
            // A message that smoltcp has no representation for is not malformed.
            match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()) {
                Ok(Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) => Ok(Parsed::EchoRequest {
                    src,
                    dst,
                    ident,
                    seq_no,
                    data,
                }),
                _ => Ok(Parsed::Other { protocol: 1 }),
            }
        }
        other => Ok(Parsed::Other {
            protocol: other.into(),
        }),
    }
}

fn parse_ipv6(bytes: &[u8]) -> Result<Parsed<'_>, Drop> {
    let packet = Ipv6Packet::new_checked(bytes).map_err(|_| Drop::Malformed)?;
    let ip = Ipv6Repr::parse(&packet).map_err(|_| Drop::Malformed)?;
    let (src, dst) = (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr));
    let payload = packet.payload();
    match ip.next_header {
        IpProtocol::Udp => parse_udp(src, dst, payload),
        IpProtocol::Tcp => parse_tcp(src, dst, payload),
        IpProtocol::Icmpv6 => {
            let icmp = Icmpv6Packet::new_checked(payload).map_err(|_| Drop::Malformed)?;
            if !icmp.verify_checksum(&ip.src_addr, &ip.dst_addr) {
                return Err(Drop::Malformed);
            }
            match Icmpv6Repr::parse(
                &ip.src_addr,
                &ip.dst_addr,
                &icmp,
                &ChecksumCapabilities::default(),
            ) {
                Ok(Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                }) => Ok(Parsed::EchoRequest {
                    src,
                    dst,
                    ident,
                    seq_no,
                    data,
                }),
                _ => Ok(Parsed::Other { protocol: 58 }),
            }
        }
        IpProtocol::HopByHop
        | IpProtocol::Ipv6Route
        | IpProtocol::Ipv6Frag
        | IpProtocol::Ipv6Opts => Err(Drop::Unsupported),
        other => Ok(Parsed::Other {
            protocol: other.into(),
        }),
    }
}

fn parse_udp(src: IpAddr, dst: IpAddr, bytes: &[u8]) -> Result<Parsed<'_>, Drop> {
    let udp = UdpPacket::new_checked(bytes).map_err(|_| Drop::Malformed)?;
    let repr = UdpRepr::parse(
        &udp,
        &src.into(),
        &dst.into(),
        &ChecksumCapabilities::default(),
    )
    .map_err(|_| Drop::Malformed)?;
    Ok(Parsed::Udp {
        src: SocketAddr::new(src, repr.src_port),
        dst: SocketAddr::new(dst, repr.dst_port),
        payload: udp.payload(),
    })
}

fn parse_tcp(src: IpAddr, dst: IpAddr, bytes: &[u8]) -> Result<Parsed<'_>, Drop> {
    let tcp = TcpPacket::new_checked(bytes).map_err(|_| Drop::Malformed)?;
    // Verifies the checksum; refuses port 0 and flag combinations such as
    // SYN+FIN or SYN+RST, which no correct stack sends.
    let repr = TcpRepr::parse(
        &tcp,
        &src.into(),
        &dst.into(),
        &ChecksumCapabilities::default(),
    )
    .map_err(|_| Drop::Malformed)?;
    let segment = TcpSegment {
        seq: repr.seq_number.0 as u32,
        ack: repr.ack_number.map(|a| a.0 as u32),
        syn: repr.control == TcpControl::Syn,
        fin: repr.control == TcpControl::Fin,
        rst: repr.control == TcpControl::Rst,
        window: repr.window_len,
        wscale: repr.window_scale,
        mss: repr.max_seg_size,
        payload: repr.payload,
        packet: None,
    };
    Ok(Parsed::Tcp {
        src: SocketAddr::new(src, repr.src_port),
        dst: SocketAddr::new(dst, repr.dst_port),
        segment,
    })
}

/// Builds a TCP segment from `src` to `dst` (one IP version). Returns `None`
/// if the addresses mix versions or the packet would exceed 65535 bytes.
pub fn build_tcp(src: SocketAddr, dst: SocketAddr, segment: &TcpSegment<'_>) -> Option<BytesMut> {
    let control = match (segment.syn, segment.fin, segment.rst) {
        (true, _, _) => TcpControl::Syn,
        (_, true, _) => TcpControl::Fin,
        (_, _, true) => TcpControl::Rst,
        _ if !segment.payload.is_empty() => TcpControl::Psh,
        _ => TcpControl::None,
    };
    // The payload goes in once, behind the headers; the header is emitted
    // around it, and its checksum covers it.
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(segment.seq as i32),
        ack_number: segment.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: segment.window,
        window_scale: segment.wscale,
        max_seg_size: segment.mss,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src_ip, dst_ip) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    build_ip(
        src.ip(),
        dst.ip(),
        IpProtocol::Tcp,
        repr.buffer_len(),
        segment.payload,
        |buf| {
            repr.emit(
                &mut TcpPacket::new_unchecked(buf),
                &src_ip,
                &dst_ip,
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// The size of the TCP packet carrying `payload_len` bytes and no options.
pub fn tcp_packet_len(ipv6: bool, payload_len: usize) -> usize {
    ip_header_len(ipv6) + 20 + payload_len
}

/// Why a destination could not be reached, for
/// [`build_dst_unreachable_tcp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No route to the network.
    Net,
    /// The host does not answer (no neighbour, or an ICMP error upstream).
    Host,
}

/// Builds the ICMP (v4) or ICMPv6 destination-unreachable error telling
/// `peer` that its TCP SYN with sequence number `syn_seq` to `dest` cannot
/// be delivered. The error comes from `dest`'s address and quotes the IP
/// header and the first 8 bytes (ports and sequence number) of the SYN,
/// which is what a stack needs to match it to the connecting socket.
pub fn build_dst_unreachable_tcp(
    peer: SocketAddr,
    dest: SocketAddr,
    syn_seq: u32,
    why: Unreachable,
) -> Option<BytesMut> {
    let mut quoted = [0u8; 8];
    quoted[0..2].copy_from_slice(&peer.port().to_be_bytes());
    quoted[2..4].copy_from_slice(&dest.port().to_be_bytes());
    quoted[4..8].copy_from_slice(&syn_seq.to_be_bytes());
    let data = &quoted[..];
    match (peer.ip(), dest.ip()) {
        (IpAddr::V4(peer4), IpAddr::V4(dest4)) => {
            let repr = Icmpv4Repr::DstUnreachable {
                reason: match why {
                    Unreachable::Net => Icmpv4DstUnreachable::NetUnreachable,
                    Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
                },
                header: Ipv4Repr {
                    src_addr: peer4,
                    dst_addr: dest4,
                    next_header: IpProtocol::Tcp,
                    payload_len: data.len(),
                    hop_limit: HOP_LIMIT,
                },
                data,
            };
            build_icmpv4(dest4, peer4, &repr)
        }
        (IpAddr::V6(peer6), IpAddr::V6(dest6)) => {
            let repr = Icmpv6Repr::DstUnreachable {
                reason: match why {
                    Unreachable::Net => Icmpv6DstUnreachable::NoRoute,
                    Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                },
                header: Ipv6Repr {
                    src_addr: peer6,
                    dst_addr: dest6,
                    next_header: IpProtocol::Tcp,
                    payload_len: data.len(),
                    hop_limit: HOP_LIMIT,
                },
                data,
            };
            build_icmpv6(dest6, peer6, &repr)
        }
        _ => None,
    }
}

/// The size of the UDP packet that [`build_udp`] would emit.
pub fn udp_packet_len(ipv6: bool, payload_len: usize) -> usize {
    ip_header_len(ipv6) + 8 + payload_len
}

fn ip_header_len(ipv6: bool) -> usize {
    if ipv6 { 40 } else { 20 }
}

/// Builds a UDP packet from `src` to `dst`, which must be of one IP version.
/// Returns `None` if the addresses mix versions or the packet would exceed
/// 65535 bytes.
pub fn build_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<BytesMut> {
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let (src_ip, dst_ip) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    // The payload goes in once, behind the headers (see `build_tcp`).
    build_ip(src.ip(), dst.ip(), IpProtocol::Udp, 8, payload, |buf| {
        repr.emit(
            &mut UdpPacket::new_unchecked(buf),
            &src_ip,
            &dst_ip,
            payload.len(),
            |_in_place| {},
            &ChecksumCapabilities::default(),
        )
    })
}

/// Builds the echo reply to an echo request from `peer` to `local`.
pub fn build_echo_reply(
    local: IpAddr,
    peer: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Option<BytesMut> {
    match (local, peer) {
        (IpAddr::V4(local4), IpAddr::V4(peer4)) => {
            let repr = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            build_icmpv4(local4, peer4, &repr)
        }
        (IpAddr::V6(local6), IpAddr::V6(peer6)) => {
            let repr = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            build_icmpv6(local6, peer6, &repr)
        }
        _ => None,
    }
}

/// Why a packet from a peer was not delivered, as an ICMP error tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// No route to the destination network.
    NetUnreachable,
    /// The destination host does not answer.
    HostUnreachable,
    /// Nothing listens on the destination port.
    PortUnreachable,
    /// The access policy forbids the destination.
    AdminProhibited,
}

/// How much of the offending packet an ICMP error quotes: as much as keeps
/// the error within 576 bytes for IPv4 (RFC 1812 §4.3.2.3) and within the
/// minimum MTU of 1280 bytes for IPv6 (RFC 4443 §2.4).
const ICMPV4_QUOTE: usize = 576 - 20 - 8;
const ICMPV6_QUOTE: usize = 1280 - 40 - 8;

/// Builds the ICMP or ICMPv6 "destination unreachable" error for
/// `original`, a packet from a peer, quoting its start verbatim. The error
/// comes from the original destination and goes to the original source.
/// Returns `None` if `original` is not a valid IP packet.
pub fn build_icmp_error(original: &[u8], why: IcmpError) -> Option<BytesMut> {
    match original.first().map(|b| b >> 4) {
        Some(4) => {
            let packet = Ipv4Packet::new_checked(original).ok()?;
            let code = match why {
                IcmpError::NetUnreachable => Icmpv4DstUnreachable::NetUnreachable,
                IcmpError::HostUnreachable => Icmpv4DstUnreachable::HostUnreachable,
                IcmpError::PortUnreachable => Icmpv4DstUnreachable::PortUnreachable,
                IcmpError::AdminProhibited => Icmpv4DstUnreachable::CommProhibited,
            };
            let quote = &original[..usize::from(packet.total_len()).min(ICMPV4_QUOTE)];
            let (src, dst) = (packet.dst_addr().into(), packet.src_addr().into());
            build_ip(src, dst, IpProtocol::Icmp, 8 + quote.len(), &[], |buf| {
                buf[8..].copy_from_slice(quote);
                let mut icmp = Icmpv4Packet::new_unchecked(buf);
                icmp.set_msg_type(Icmpv4Message::DstUnreachable);
                icmp.set_msg_code(code.into());
                icmp.fill_checksum();
            })
        }
        Some(6) => {
            let packet = Ipv6Packet::new_checked(original).ok()?;
            let code = match why {
                IcmpError::NetUnreachable => Icmpv6DstUnreachable::NoRoute,
                IcmpError::HostUnreachable => Icmpv6DstUnreachable::AddrUnreachable,
                IcmpError::PortUnreachable => Icmpv6DstUnreachable::PortUnreachable,
                IcmpError::AdminProhibited => Icmpv6DstUnreachable::AdminProhibit,
            };
            let whole = 40 + usize::from(packet.payload_len());
            let quote = &original[..whole.min(ICMPV6_QUOTE)];
            let (src, dst) = (packet.dst_addr(), packet.src_addr());
            build_ip(
                src.into(),
                dst.into(),
                IpProtocol::Icmpv6,
                8 + quote.len(),
                &[],
                |buf| {
                    buf[8..].copy_from_slice(quote);
                    let mut icmp = Icmpv6Packet::new_unchecked(buf);
                    icmp.set_msg_type(Icmpv6Message::DstUnreachable);
                    icmp.set_msg_code(code.into());
                    icmp.fill_checksum(&src, &dst);
                },
            )
        }
        _ => None,
    }
}

/// Builds an ICMP (v4) message from `src` to `dst`.
fn build_icmpv4(src: Ipv4Addr, dst: Ipv4Addr, repr: &Icmpv4Repr<'_>) -> Option<BytesMut> {
    build_ip(
        src.into(),
        dst.into(),
        IpProtocol::Icmp,
        repr.buffer_len(),
        &[],
        |buf| {
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// Builds an ICMPv6 message from `src` to `dst`.
fn build_icmpv6(src: Ipv6Addr, dst: Ipv6Addr, repr: &Icmpv6Repr<'_>) -> Option<BytesMut> {
    build_ip(
        src.into(),
        dst.into(),
        IpProtocol::Icmpv6,
        repr.buffer_len(),
        &[],
        |buf| {
            repr.emit(
                &src,
                &dst,
                &mut Icmpv6Packet::new_unchecked(buf),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// Spare capacity after every packet the router builds, so that a transport
/// can frame it in the same buffer: WireGuard pads to a multiple of 16 bytes
/// (at most 15 more) and adds 32 (a 16-byte header, for which the packet
/// moves up, and a 16-byte tag). Without it, each packet sent to a peer cost
/// an allocation, a zeroing and a copy in the encryptor.
pub const TRANSPORT_TAILROOM: usize = 15 + 32;

/// Builds an IP packet of `protocol` whose payload is a header of
/// `header_len` bytes followed by `data`: the data is written once, in
/// place, and `emit_header` then gets the whole payload (header and data) to
/// fill in the header and its checksum.
fn build_ip(
    src: IpAddr,
    dst: IpAddr,
    protocol: IpProtocol,
    header_len: usize,
    data: &[u8],
    emit_header: impl FnOnce(&mut [u8]),
) -> Option<BytesMut> {
    let ip_header = ip_header_len(src.is_ipv6());
    let payload_len = header_len + data.len();
    // IPv4 counts its header in the 16-bit total length; IPv6 does not.
    let total = ip_header + payload_len;
    let counted = if src.is_ipv6() { payload_len } else { total };
    if counted > usize::from(u16::MAX) {
        return None;
    }
    let mut buf = BytesMut::with_capacity(total + TRANSPORT_TAILROOM);
    buf.put_bytes(0, ip_header + header_len);
    buf.extend_from_slice(data);
    match (src, dst) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let repr = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: protocol,
                payload_len,
                hop_limit: HOP_LIMIT,
            };
            let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut packet, &ChecksumCapabilities::default());
            emit_header(packet.payload_mut());
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let repr = Ipv6Repr {
                src_addr,
                dst_addr,
                next_header: protocol,
                payload_len,
                hop_limit: HOP_LIMIT,
            };
            let mut packet = Ipv6Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut packet);
            emit_header(packet.payload_mut());
        }
        _ => return None,
    }
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn share_views_large_parts_of_the_packet_and_copies_the_rest() {
        let packet = Bytes::from(vec![7u8; 2000]);
        let inside = &packet[100..100 + MIN_SHARED];
        let viewed = share(Some(&packet), inside);
        assert_eq!(viewed.as_ptr(), inside.as_ptr());
        assert_eq!(viewed, inside);
        for (from, part) in [
            (Some(&packet), &packet[100..100 + MIN_SHARED - 1]),
            (None, inside),
            (Some(&Bytes::from(vec![0u8; 2000])), inside),
        ] {
            let copied = share(from, part);
            assert_ne!(copied.as_ptr(), part.as_ptr());
            assert_eq!(copied, part);
        }
        let elsewhere = vec![7u8; MIN_SHARED];
        assert_eq!(share(Some(&packet), &elsewhere), elsewhere);
    }

    #[test]
    fn udp_round_trip_v4_and_v6() {
        for (src, dst) in [
            (addr("10.0.0.2:4000"), addr("198.18.0.1:53")),
            (addr("[fd00::2]:4000"), addr("[fd00:1::1]:53")),
        ] {
            let packet = build_udp(src, dst, b"hello").unwrap();
            assert_eq!(packet.len(), udp_packet_len(src.is_ipv6(), 5));
            assert_eq!(
                parse(&packet),
                Ok(Parsed::Udp {
                    src,
                    dst,
                    payload: b"hello"
                })
            );
        }
    }

    #[test]
    fn echo_reply_parses_as_other_icmp() {
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let reply = build_echo_reply(local, peer, 7, 9, b"ping").unwrap();
        assert_eq!(parse(&reply), Ok(Parsed::Other { protocol: 1 }));
    }

    #[test]
    fn icmp_errors_quote_the_packet_and_go_back_to_its_source() {
        for (src, dst) in [
            (addr("10.0.0.2:4000"), addr("198.18.0.1:53")),
            (addr("[fd00::2]:4000"), addr("[fd00:1::1]:53")),
        ] {
            let original = build_udp(src, dst, &[0xab; 2000]).unwrap();
            let error = build_icmp_error(&original, IcmpError::AdminProhibited).unwrap();
            assert!(error.len() <= if src.is_ipv4() { 576 } else { 1280 });
            assert_eq!(
                parse(&error),
                Ok(Parsed::Other {
                    protocol: if src.is_ipv4() { 1 } else { 58 }
                })
            );
            let (error_src, error_dst) = if src.is_ipv4() {
                let view = Ipv4Packet::new_checked(&error[..]).unwrap();
                (IpAddr::V4(view.src_addr()), IpAddr::V4(view.dst_addr()))
            } else {
                let view = Ipv6Packet::new_checked(&error[..]).unwrap();
                (IpAddr::V6(view.src_addr()), IpAddr::V6(view.dst_addr()))
            };
            assert_eq!((error_src, error_dst), (dst.ip(), src.ip()));
            // The quote starts with the original IP header.
            let header = if src.is_ipv4() { 20 } else { 40 };
            let quote_at = header + 8;
            assert_eq!(&error[quote_at..quote_at + header], &original[..header]);
        }
        assert!(build_icmp_error(b"junk", IcmpError::PortUnreachable).is_none());
    }

    #[test]
    fn mixed_versions_build_nothing() {
        assert!(build_udp(addr("10.0.0.2:1"), addr("[::1]:1"), b"").is_none());
    }

    #[test]
    fn oversized_payload_builds_nothing() {
        let big = vec![0; 65535];
        assert!(build_udp(addr("10.0.0.2:1"), addr("10.0.0.1:1"), &big).is_none());
    }

    #[test]
    fn corrupted_udp_checksum_is_malformed() {
        let mut packet = build_udp(addr("10.0.0.2:1"), addr("10.0.0.1:2"), b"data").unwrap();
        let last = packet.len() - 1;
        packet[last] ^= 0xff;
        assert_eq!(parse(&packet), Err(Drop::Malformed));
    }

    #[test]
    fn ipv4_total_length_zero_is_malformed_not_a_panic() {
        let mut packet = build_udp(addr("10.0.0.2:1"), addr("10.0.0.1:2"), b"data").unwrap();
        packet[2] = 0;
        packet[3] = 0;
        assert_eq!(parse(&packet), Err(Drop::Malformed));
    }

    #[test]
    fn truncations_of_valid_packets_never_panic() {
        let packets = [
            build_udp(addr("10.0.0.2:1"), addr("10.0.0.1:2"), b"data").unwrap(),
            build_udp(addr("[fd00::2]:1"), addr("[fd00::1]:2"), b"data").unwrap(),
            build_echo_reply(
                "fd00::1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                1,
                2,
                b"x",
            )
            .unwrap(),
            build_tcp(
                addr("[fd00::2]:1"),
                addr("[fd00::1]:2"),
                &TcpSegment {
                    payload: b"data",
                    ..TcpSegment::default()
                },
            )
            .unwrap(),
        ];
        for packet in &packets {
            for len in 0..packet.len() {
                assert!(parse(&packet[..len]).is_err(), "length {len} parsed");
            }
        }
    }

    fn syn<'a>() -> TcpSegment<'a> {
        TcpSegment {
            seq: 0xdead_beef,
            syn: true,
            window: 64240,
            wscale: Some(7),
            mss: Some(1380),
            ..TcpSegment::default()
        }
    }

    #[test]
    fn tcp_round_trip_v4_and_v6() {
        for (src, dst) in [
            (addr("10.0.0.2:40000"), addr("198.18.0.1:80")),
            (addr("[fd00::2]:40000"), addr("[fd00:1::1]:80")),
        ] {
            let packet = build_tcp(src, dst, &syn()).unwrap();
            assert_eq!(
                parse(&packet),
                Ok(Parsed::Tcp {
                    src,
                    dst,
                    segment: syn()
                })
            );
            let data = TcpSegment {
                seq: 7,
                ack: Some(u32::MAX),
                fin: true,
                window: 100,
                payload: b"bytes",
                ..TcpSegment::default()
            };
            let packet = build_tcp(dst, src, &data).unwrap();
            assert_eq!(packet.len(), tcp_packet_len(src.is_ipv6(), 5));
            let Ok(Parsed::Tcp { segment, .. }) = parse(&packet) else {
                panic!("did not parse");
            };
            assert_eq!(segment, data);
            assert_eq!(segment.seq_len(), 6);
        }
    }

    #[test]
    fn corrupted_tcp_checksum_and_truncations_are_malformed() {
        let packet = build_tcp(addr("10.0.0.2:1"), addr("10.0.0.1:2"), &syn()).unwrap();
        for len in 0..packet.len() {
            assert!(parse(&packet[..len]).is_err(), "length {len} parsed");
        }
        let mut bad = packet.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert_eq!(parse(&bad), Err(Drop::Malformed));
    }

    #[test]
    fn unreachable_quotes_the_syn() {
        let (peer, dest) = (addr("10.0.0.2:40000"), addr("198.18.0.1:80"));
        let packet = build_dst_unreachable_tcp(peer, dest, 0x0102_0304, Unreachable::Host).unwrap();
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(
            ip.src_addr(),
            "198.18.0.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.msg_type().into(), icmp.msg_code()), (3u8, 1u8));
        // The quoted data: original IP header (20 bytes), then ports and sequence number.
        let quoted = &icmp.data()[20..];
        assert_eq!(quoted, &[0x9c, 0x40, 0, 80, 1, 2, 3, 4]);

        let (peer, dest) = (addr("[fd00::2]:40000"), addr("[fd00:1::1]:80"));
        let packet = build_dst_unreachable_tcp(peer, dest, 1, Unreachable::Net).unwrap();
        let ip = Ipv6Packet::new_checked(&packet[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!((u8::from(icmp.msg_type()), icmp.msg_code()), (1, 0));
    }

    #[test]
    fn fragments_are_unsupported() {
        let mut packet = build_udp(addr("10.0.0.2:1"), addr("10.0.0.1:2"), b"data").unwrap();
        let mut view = Ipv4Packet::new_unchecked(&mut packet[..]);
        view.set_more_frags(true);
        view.fill_checksum();
        assert_eq!(parse(&packet), Err(Drop::Unsupported));
    }
}
