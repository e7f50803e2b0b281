//! ICMP handled by the router itself: the pingable addresses (`-P`).
//!
//! An echo request (ICMP or ICMPv6) to a pingable address is answered at
//! once with an echo reply carrying the same identifier, sequence number and
//! payload. Echo requests to other addresses are not forwarded yet.

use std::net::IpAddr;

use bytes::BytesMut;

use super::packet;

/// Answers an echo request from `src` to `dst` if `dst` is pingable.
/// Returns `None` when it is not ours to answer.
pub fn answer_echo(
    pingable: &[IpAddr],
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Option<BytesMut> {
    if !pingable.contains(&dst) {
        return None;
    }
    packet::build_echo_reply(dst, src, ident, seq_no, data)
}
