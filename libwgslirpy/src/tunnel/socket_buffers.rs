//! Kernel buffers of the tunnel's UDP socket.
//!
//! # Theory of operation
//!
//! Every packet of every peer arrives on one UDP socket. When the gateway
//! falls behind for a moment (a burst from a peer, a busy core), the
//! socket's receive buffer is what holds the packets, and a datagram that
//! finds it full is dropped by the kernel: the peer's TCP sees a loss and
//! backs off, exponentially if its retransmission is lost as well. With
//! Linux's usual default of 208 KiB, 200 concurrent uploads through a
//! debug build lost tens of thousands of datagrams a minute there, and a
//! connection could sit minutes in its peer's retransmission backoff.
//!
//! So the socket asks for [`Config::tunnel_socket_buffer`] bytes each way,
//! as wireguard-go does: first with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`,
//! which only a process with `CAP_NET_ADMIN` may use, then with
//! `SO_RCVBUF` / `SO_SNDBUF`, which the kernel caps at
//! `net.core.rmem_max` / `wmem_max` without an error. The size is a limit,
//! not an allocation: memory is only taken while packets wait. What the
//! kernel granted is logged once at startup, with the sysctl to raise when
//! it is less than asked for.
//!
//! [`Config::tunnel_socket_buffer`]: crate::Config::tunnel_socket_buffer

use std::os::fd::AsFd;

use socket2::SockRef;

/// Asks for `bytes` of receive and send buffer on the tunnel socket, and
/// logs what the kernel granted. Never fails: a socket with smaller buffers
/// still works, only with more loss under bursts.
pub(super) fn request(socket: &impl AsFd, bytes: usize) {
    let socket = SockRef::from(socket);
    let granted_receive = set(&socket, Direction::Receive, bytes);
    let granted_send = set(&socket, Direction::Send, bytes);
    let short = |granted: Option<usize>| granted.is_some_and(|granted| granted < bytes);
    if short(granted_receive) || short(granted_send) {
        tracing::info!(
            asked = bytes,
            receive = granted_receive,
            send = granted_send,
            "the tunnel socket's buffers are smaller than asked for: the kernel caps them at \
             net.core.rmem_max and net.core.wmem_max (raise those, or run with CAP_NET_ADMIN)"
        );
    } else {
        tracing::debug!(
            receive = granted_receive,
            send = granted_send,
            "tunnel socket buffers"
        );
    }
}

/// Which of the socket's two buffers.
#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Send,
}

/// Sets one buffer to `bytes`, forced if the process may, and returns what
/// the kernel granted in the caller's terms (Linux reports twice the usable
/// size, the other half being its bookkeeping), or None if it cannot say.
fn set(socket: &SockRef<'_>, direction: Direction, bytes: usize) -> Option<usize> {
    if !force(socket, direction, bytes) {
        let plain = match direction {
            Direction::Receive => socket.set_recv_buffer_size(bytes),
            Direction::Send => socket.set_send_buffer_size(bytes),
        };
        if let Err(error) = plain {
            tracing::debug!(%error, "cannot size the tunnel socket's buffer");
        }
    }
    let reported = match direction {
        Direction::Receive => socket.recv_buffer_size(),
        Direction::Send => socket.send_buffer_size(),
    };
    let halve = cfg!(any(target_os = "linux", target_os = "android"));
    reported
        .ok()
        .map(|size| if halve { size / 2 } else { size })
}

/// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`: beyond the sysctl cap, for a process
/// with `CAP_NET_ADMIN`. False where refused or not offered.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn force(socket: &SockRef<'_>, direction: Direction, bytes: usize) -> bool {
    use nix::sys::socket::{setsockopt, sockopt};
    match direction {
        Direction::Receive => setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &bytes).is_ok(),
        Direction::Send => setsockopt(&socket.as_fd(), sockopt::SndBufForce, &bytes).is_ok(),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn force(_: &SockRef<'_>, _: Direction, _: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the process may do, the buffers end up at least at the
    /// default and no larger than asked; as root they are exactly as asked.
    #[test]
    fn buffers_are_raised_up_to_what_is_asked() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = SockRef::from(&socket).recv_buffer_size().unwrap() / 2;
        let asked = 4 << 20;
        request(&socket, asked);
        let after = SockRef::from(&socket).recv_buffer_size().unwrap() / 2;
        assert!(after >= before.min(asked), "{before} -> {after}");
        assert!(after <= asked, "{after} > {asked}");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(after, asked);
            let send = SockRef::from(&socket).send_buffer_size().unwrap() / 2;
            assert_eq!(send, asked);
        }
    }

    /// A small request is honoured too (the buffer shrinks).
    #[test]
    fn a_small_request_shrinks_the_buffers() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        request(&socket, 8192);
        assert_eq!(SockRef::from(&socket).recv_buffer_size().unwrap() / 2, 8192);
        assert_eq!(SockRef::from(&socket).send_buffer_size().unwrap() / 2, 8192);
    }
}
