//! Steering each peer's datagrams to the receive lane of that peer.
//!
//! # Theory of operation
//!
//! With `--threads N`, the tunnel's port is N sockets in one `SO_REUSEPORT`
//! group, each read and decrypted by a lane of its own. Left to itself, the
//! kernel picks a socket by a hash of the two endpoints: one peer's packets
//! stay on one socket, but two peers share a lane as often as not with two
//! lanes, and a roaming peer changes lane.
//!
//! gotatun (patch 6) confines each peer's session indices to a lane, peers
//! taking the lanes in turn: the low byte of every index we hand out is the
//! peer's lane modulo N. Every message a peer sends us names one of those
//! indices, little-endian, so its first byte is that low byte: at offset 4
//! in a data message and a cookie reply, and at offset 8 in a handshake
//! response. A classic BPF program attached to the group
//! (`SO_ATTACH_REUSEPORT_CBPF`, which needs no privilege) reads that byte
//! and returns it modulo N: the index of the socket in the group. A
//! handshake initiation carries the peer's own random index there, so
//! initiations spread over the lanes, as any lane may answer one. A
//! datagram too short for the load makes the program return 0 (lane 0).
//!
//! The kernel runs the program on the UDP payload, and falls back to its
//! hash when the index returned is not a socket of the group (while the
//! group is still being bound). A byte tells at most 255 lanes apart: with
//! more threads than that, peers share the first 255 lanes and the rest
//! receive nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (`asm-generic/socket.h`; libc exports it for
/// Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The program for `lanes` sockets: the lane of the receiver index that
/// the datagram names.
fn program(lanes: usize) -> [libc::sock_filter; 8] {
    let lanes = lanes.clamp(1, 255) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load_byte = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
    let modulo = libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K;
    let ret_a = libc::BPF_RET | libc::BPF_A;
    [
        // The message type.
        op(load_byte, 0, 0, 0),
        // A handshake response names our index at 8, the others at 4.
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 3, 0, 2),
        op(load_byte, 0, 0, 4),
        op(modulo, 0, 0, lanes),
        op(ret_a, 0, 0, 0),
        op(load_byte, 0, 0, 8),
        op(modulo, 0, 0, lanes),
        op(ret_a, 0, 0, 0),
    ]
}

/// Attaches the steering program for `lanes` sockets to the
/// `SO_REUSEPORT` group of `socket` (which must have joined it, bound).
pub(super) fn steer_by_receiver_index(socket: &impl AsFd, lanes: usize) -> io::Result<()> {
    let mut filter = program(lanes);
    let fprog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `filter`, both live across the call, and
    // the kernel copies the program; the length passed is `fprog`'s own.
    let result = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    use std::time::Duration;

    use socket2::{Domain, Socket, Type};

    use super::*;

    /// `lanes` sockets sharing one port of `loopback`, the program attached.
    fn group(loopback: IpAddr, lanes: usize) -> Vec<UdpSocket> {
        let mut sockets: Vec<UdpSocket> = Vec::new();
        for _ in 0..lanes {
            let socket = Socket::new(
                Domain::for_address(SocketAddr::new(loopback, 0)),
                Type::DGRAM,
                None,
            )
            .unwrap();
            socket.set_reuse_port(true).unwrap();
            let addr = sockets
                .first()
                .map_or(SocketAddr::new(loopback, 0), |first| {
                    first.local_addr().unwrap()
                });
            socket.bind(&addr.into()).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            sockets.push(socket.into());
        }
        steer_by_receiver_index(&sockets[0], lanes).unwrap();
        sockets
    }

    /// Which socket of `group` received `datagram`, sent from a new port.
    fn lane_of(group: &[UdpSocket], datagram: &[u8]) -> usize {
        let to = group[0].local_addr().unwrap();
        let sender = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).unwrap();
        sender.send_to(datagram, to).unwrap();
        let mut buf = [0u8; 64];
        let mut found = Vec::new();
        for (lane, socket) in group.iter().enumerate() {
            if let Ok(n) = socket.recv(&mut buf) {
                assert_eq!(&buf[..n], datagram);
                found.push(lane);
            }
        }
        assert_eq!(found.len(), 1, "one socket got it: {found:?}");
        found[0]
    }

    /// A WireGuard-like message of `kind` whose index field (at `at`) is
    /// `index`, little-endian.
    fn message(kind: u8, at: usize, index: u32) -> Vec<u8> {
        let mut datagram = vec![0u8; 32];
        datagram[0] = kind;
        datagram[at..at + 4].copy_from_slice(&index.to_le_bytes());
        datagram
    }

    #[test]
    fn each_message_goes_to_the_lane_of_the_index_it_names() {
        let loopbacks = [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ];
        for (loopback, lanes) in [(loopbacks[0], 2), (loopbacks[0], 3), (loopbacks[1], 2)] {
            let group = group(loopback, lanes);
            for index in [0u32, 1, 2, 0x1234_5605, 0xffff_ffff, 0xdead_be07] {
                let lane = (index & 0xff) as usize % lanes;
                for (kind, at) in [(4, 4), (3, 4), (2, 8), (1, 4)] {
                    assert_eq!(
                        lane_of(&group, &message(kind, at, index)),
                        lane,
                        "type {kind}, index {index:#x}, {lanes} lanes"
                    );
                }
            }
            // Whatever port a peer sends from: the index alone decides.
            for _ in 0..10 {
                assert_eq!(lane_of(&group, &message(4, 4, 0x0000_0101)), 1);
            }
            assert_eq!(lane_of(&group, &[4, 0, 0]), 0, "too short: lane 0");
        }
    }
}
