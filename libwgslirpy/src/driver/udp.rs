//! Host UDP sockets for the router's UDP flows.
//!
//! Each flow gets one socket bound to an ephemeral port on the unspecified
//! address of its family (IPv6 sockets are v6-only), and one reader task
//! that forwards every datagram to the router task. Sends never wait: a
//! datagram that the socket cannot take at once is dropped, as a congested
//! router drops it. Closing a flow aborts its reader and closes the socket.
//!
//! Memory: a reader holds no buffer while it waits. When its socket is
//! readable it peeks at the next datagram's length (`MSG_PEEK | MSG_TRUNC`)
//! and receives into an allocation of exactly that size, which becomes the
//! event's payload. A 64 KiB buffer per reader, as before, made 4,096 idle
//! flows cost about 300 MB (measured: a flood of 20,000 new flows).
//!
//! Sockets ask for ICMP errors (`IP_RECVERR`/`IPV6_RECVERR`). When a
//! destination answers with "port unreachable" (or net or host
//! unreachable), the kernel queues the error with the address that caused
//! it; the reader drains that queue and reports each error, so that the
//! peer gets the matching ICMP error instead of silence.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::HostEvent;
use crate::core::FlowId;
use crate::core::packet::IcmpError;

struct FlowSocket {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

impl Drop for FlowSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The open UDP sockets, by flow.
pub(super) struct UdpSockets {
    sockets: HashMap<FlowId, FlowSocket>,
    events: mpsc::Sender<HostEvent>,
}

impl UdpSockets {
    pub(super) fn new(events: mpsc::Sender<HostEvent>) -> Self {
        UdpSockets {
            sockets: HashMap::new(),
            events,
        }
    }

    /// Opens the socket of `flow` and starts its reader.
    pub(super) fn open(&mut self, flow: FlowId, ipv6: bool) -> io::Result<()> {
        let socket = Arc::new(bind_ephemeral(ipv6)?);
        let reader = tokio::spawn(read_datagrams(flow, socket.clone(), self.events.clone()));
        self.sockets.insert(flow, FlowSocket { socket, reader });
        Ok(())
    }

    /// Sends `payload` to `dest` from the socket of `flow`, if it can go now.
    pub(super) fn send(&mut self, flow: FlowId, dest: SocketAddr, payload: &[u8]) {
        let Some(flow_socket) = self.sockets.get(&flow) else {
            return;
        };
        // Straight to the non-blocking socket: tokio's `try_send_to` reports
        // WouldBlock until the reactor has seen the socket writable once,
        // which would drop the first datagram of every flow.
        let socket = socket2::SockRef::from(&*flow_socket.socket);
        if let Err(error) = socket.send_to(payload, &dest.into()) {
            tracing::debug!(flow = flow.0, %dest, %error, "UDP send failed; datagram dropped");
        }
    }

    /// Closes the socket of `flow`.
    pub(super) fn close(&mut self, flow: FlowId) {
        self.sockets.remove(&flow);
    }
}

fn bind_ephemeral(ipv6: bool) -> io::Result<UdpSocket> {
    let (domain, addr) = if ipv6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if ipv6 {
        socket.set_only_v6(true)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6RecvErr, &true)?;
    } else {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

async fn read_datagrams(flow: FlowId, socket: Arc<UdpSocket>, events: mpsc::Sender<HostEvent>) {
    loop {
        match socket
            // ERROR too, as tokio's own `recv_from` asks: a queued ICMP error
            // makes the socket report an error, not readability.
            .async_io(Interest::READABLE | Interest::ERROR, || recv_exact(&socket))
            .await
        {
            Ok((payload, from)) => {
                let event = HostEvent::UdpDatagram {
                    flow,
                    from,
                    payload: Bytes::from(payload),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::trace!(flow = flow.0, %error, "UDP receive error");
                for (dest, why) in read_error_queue(&socket) {
                    let event = HostEvent::UdpUnreachable { flow, dest, why };
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Receives the next datagram into an allocation of its size. `WouldBlock`
/// when there is none; the error of a queued ICMP error otherwise.
fn recv_exact(socket: &UdpSocket) -> io::Result<(Vec<u8>, SocketAddr)> {
    use nix::sys::socket::{MsgFlags, SockaddrStorage, recv, recvfrom};
    use std::os::fd::AsRawFd as _;

    let fd = socket.as_raw_fd();
    // With MSG_TRUNC, a UDP socket returns the datagram's real length.
    let len = recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC)?;
    let mut payload = vec![0; len];
    let (n, from) = recvfrom::<SockaddrStorage>(fd, &mut payload)?;
    payload.truncate(n);
    let from = from
        .as_ref()
        .and_then(socket_addr)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok((payload, from))
}

/// Takes every queued ICMP error off `socket`: the destination that caused
/// it, and what it said. Errors of other kinds are skipped.
fn read_error_queue(socket: &UdpSocket) -> Vec<(SocketAddr, IcmpError)> {
    use std::os::fd::AsRawFd as _;

    use nix::libc;
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};

    let mut errors = Vec::new();
    // Bounded: the kernel queues a limited number of errors per socket.
    for _ in 0..64 {
        let mut data = [0u8; 64];
        let mut iov = [io::IoSliceMut::new(&mut data)];
        let mut control = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
        let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
        let Ok(message) =
            recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut control), flags)
        else {
            break;
        };
        let dest = message.address.as_ref().and_then(socket_addr);
        let Ok(control_messages) = message.cmsgs() else {
            continue;
        };
        for control_message in control_messages {
            let why = match control_message {
                ControlMessageOwned::Ipv4RecvErr(error, _)
                    if error.ee_origin == libc::SO_EE_ORIGIN_ICMP && error.ee_type == 3 =>
                {
                    match error.ee_code {
                        0 => Some(IcmpError::NetUnreachable),
                        1 => Some(IcmpError::HostUnreachable),
                        3 => Some(IcmpError::PortUnreachable),
                        _ => None,
                    }
                }
                ControlMessageOwned::Ipv6RecvErr(error, _)
                    if error.ee_origin == libc::SO_EE_ORIGIN_ICMP6 && error.ee_type == 1 =>
                {
                    match error.ee_code {
                        0 => Some(IcmpError::NetUnreachable),
                        3 => Some(IcmpError::HostUnreachable),
                        4 => Some(IcmpError::PortUnreachable),
                        _ => None,
                    }
                }
                _ => None,
            };
            if let (Some(dest), Some(why)) = (dest, why) {
                errors.push((dest, why));
            }
        }
    }
    errors
}

/// The IP socket address in `addr`, if it holds one.
pub(super) fn socket_addr(addr: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
        (Some(v4), _) => Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4))),
        (_, Some(v6)) => Some(SocketAddr::from(std::net::SocketAddrV6::from(*v6))),
        _ => None,
    }
}
