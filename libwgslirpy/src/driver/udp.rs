//! Host UDP sockets for the router's UDP flows.
//!
//! Each flow gets one socket bound to an ephemeral port on the unspecified
//! address of its family (IPv6 sockets are v6-only). Like TCP sockets
//! ([`super::tcp`]), they have no task: the router task services a flow
//! whose socket the reactor found readable ([`super::ready`]), reading up to
//! [`MAX_DATAGRAMS`] datagrams into one buffer shared by all flows and
//! handing each to the core at once, so a datagram costs no allocation and
//! no hand-off between tasks, and one busy flow cannot starve the others.
//! Reads stop when the core's transmit queue is full (the driver passes its
//! room as a budget), so a burst the tunnel cannot take yet waits in the
//! sockets' buffers, where the kernel drops the excess per socket. Sends
//! never wait: a datagram that the socket cannot take at once is dropped, as
//! a congested router drops it.
//!
//! Sockets ask for ICMP errors (`IP_RECVERR`/`IPV6_RECVERR`). When a
//! destination answers with "port unreachable" (or net or host
//! unreachable), the kernel queues the error with the address that caused
//! it, and (with `SO_SELECT_ERR_QUEUE`) reports the socket readable; the
//! service drains that queue and reports each error, so that the peer gets
//! the matching ICMP error instead of silence.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::ready::{DueFlows, SocketWaker, read_until_blocked};
use crate::core::FlowId;
use crate::core::packet::IcmpError;

/// Most datagrams read from one socket in one service.
const MAX_DATAGRAMS: usize = 32;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65535;

/// What servicing a flow found, for the core.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum UdpEvent<'a> {
    /// A datagram arrived from `from`.
    Datagram {
        /// Its source.
        from: SocketAddr,
        /// Its payload.
        payload: &'a [u8],
    },
    /// `dest` answered a datagram with an ICMP error.
    Unreachable {
        /// The destination that answered.
        dest: SocketAddr,
        /// What it said.
        why: IcmpError,
    },
}

struct FlowSocket {
    socket: AsyncFd<std::net::UdpSocket>,
    waker: SocketWaker,
}

/// The open UDP sockets, by flow.
pub(super) struct UdpSockets {
    sockets: HashMap<FlowId, FlowSocket>,
    due: DueFlows,
    buf: Box<[u8]>,
}

impl UdpSockets {
    pub(super) fn new() -> Self {
        UdpSockets {
            sockets: HashMap::new(),
            due: DueFlows::default(),
            buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        }
    }

    /// Opens the socket of `flow`.
    pub(super) fn open(&mut self, flow: FlowId, ipv6: bool) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::PRIORITY;
        // SAFETY: a `std::net::UdpSocket` owns its descriptor and keeps it
        // open, the same one, until it is dropped with the `AsyncFd`.
        let socket = unsafe { AsyncFd::register_with_interest(bind_ephemeral(ipv6)?, interest) }
            .map_err(io::Error::from)?;
        let waker = self.due.waker(flow);
        self.sockets.insert(flow, FlowSocket { socket, waker });
        // The first service registers the wait for datagrams.
        self.due.push(flow);
        Ok(())
    }

    /// Sends `payload` to `dest` from the socket of `flow`, if it can go now.
    pub(super) fn send(&mut self, flow: FlowId, dest: SocketAddr, payload: &[u8]) {
        let Some(flow_socket) = self.sockets.get(&flow) else {
            return;
        };
        // Straight to the non-blocking socket, without waiting for the
        // reactor to have seen it writable.
        if let Err(error) = flow_socket.socket.get_ref().send_to(payload, dest) {
            tracing::debug!(flow = flow.0, %dest, %error, "UDP send failed; datagram dropped");
        }
    }

    /// Closes the socket of `flow`.
    pub(super) fn close(&mut self, flow: FlowId) {
        self.sockets.remove(&flow);
    }

    /// Ready when some flow's socket is due for service.
    pub(super) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.due.poll(cx)
    }

    /// Services every flow due now, once, and reports what arrived with
    /// `report`: at most [`MAX_DATAGRAMS`] per flow, and `budget` in all
    /// (decreased by what was read). A flow that had more waiting stays
    /// due. Returns whether any flow was due.
    pub(super) fn service(
        &mut self,
        budget: &mut usize,
        mut report: impl FnMut(FlowId, UdpEvent<'_>),
    ) -> bool {
        let (sockets, buf) = (&self.sockets, &mut self.buf);
        self.due.service_each(|flow| match sockets.get(&flow) {
            Some(f) => service_one(flow, f, buf, budget, &mut report),
            None => true,
        })
    }
}

/// Reads what waits on the socket of `flow`, up to [`MAX_DATAGRAMS`] and
/// `budget`. Returns false if it stopped at a bound, with more perhaps
/// waiting.
fn service_one(
    flow: FlowId,
    f: &FlowSocket,
    buf: &mut [u8],
    budget: &mut usize,
    report: &mut impl FnMut(FlowId, UdpEvent<'_>),
) -> bool {
    let waker = f.waker.rearm();
    let mut cx = Context::from_waker(&waker);
    read_until_blocked(&f.socket, &mut cx, MAX_DATAGRAMS, budget, |socket| {
        // The buffer holds the largest datagram, so none is cut short.
        match socket.recv_from(buf) {
            Ok((n, from)) => {
                report(
                    flow,
                    UdpEvent::Datagram {
                        from,
                        payload: &buf[..n],
                    },
                );
                Ok(true)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Err(error),
            // The error of a queued ICMP error.
            Err(error) => {
                tracing::trace!(flow = flow.0, %error, "UDP receive error");
                for (dest, why) in read_error_queue(socket) {
                    report(flow, UdpEvent::Unreachable { dest, why });
                }
                Ok(false)
            }
        }
    })
}

fn bind_ephemeral(ipv6: bool) -> io::Result<std::net::UdpSocket> {
    let (domain, addr) = if ipv6 {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
    } else {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    };
    let socket = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if ipv6 {
        socket.set_only_v6(true)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6RecvErr, &true)?;
    } else {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
    }
    select_error_queue(&socket)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sets `SO_SELECT_ERR_QUEUE`: a queued error then makes the socket report
/// priority data (`EPOLLPRI`), which the reactor reports as readable, not
/// only `EPOLLERR`, which would wake no reader.
fn select_error_queue(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an option value of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SELECT_ERR_QUEUE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes every queued ICMP error off `socket`: the destination that caused
/// it, and what it said. Errors of other kinds are skipped.
fn read_error_queue(socket: &std::net::UdpSocket) -> Vec<(SocketAddr, IcmpError)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Services the sockets until `want` events arrived, waiting for the
    /// reactor in between (for at most 10 s).
    async fn events(sockets: &mut UdpSockets, want: usize) -> Vec<(FlowId, String)> {
        let mut seen = Vec::new();
        let mut unlimited = usize::MAX;
        let wait = async {
            while seen.len() < want {
                std::future::poll_fn(|cx| sockets.poll_due(cx)).await;
                sockets.service(&mut unlimited, |flow, event| {
                    seen.push((flow, format!("{event:?}")))
                });
            }
        };
        let waited = tokio::time::timeout(std::time::Duration::from_secs(10), wait).await;
        assert!(waited.is_ok(), "only {} of {want} events came", seen.len());
        seen
    }

    /// A service reads no more than its budget; what is left waits in the
    /// socket, and the flow stays due for the next service.
    #[tokio::test]
    async fn reads_stop_at_the_budget_and_the_rest_waits() {
        let remote = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sockets = UdpSockets::new();
        let flow = FlowId(5);
        sockets.open(flow, false).unwrap();
        // The first service registers the socket; nothing has come yet.
        sockets.service(&mut 10, |_, event| panic!("{event:?}"));
        let port = sockets.sockets[&flow]
            .socket
            .get_ref()
            .local_addr()
            .unwrap()
            .port();
        for i in 0..10u8 {
            remote.send_to(&[i], ("127.0.0.1", port)).unwrap();
        }
        std::future::poll_fn(|cx| sockets.poll_due(cx)).await;
        let mut got = Vec::new();
        let mut budget = 4;
        sockets.service(&mut budget, |_, event| got.push(format!("{event:?}")));
        assert_eq!((got.len(), budget), (4, 0));
        // Still due, without another readiness: the rest is read now.
        let mut budget = 100;
        assert!(sockets.service(&mut budget, |_, event| got.push(format!("{event:?}"))));
        assert_eq!((got.len(), budget), (10, 94));
    }

    /// Datagrams come back through the service, more than one service's
    /// worth included, and a closed port's ICMP error wakes the flow and is
    /// reported with the address that caused it.
    #[tokio::test]
    async fn datagrams_and_icmp_errors_reach_the_router() {
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let mut sockets = UdpSockets::new();
        let flow = FlowId(3);
        sockets.open(flow, false).unwrap();

        let count = MAX_DATAGRAMS + 5;
        for i in 0..count {
            sockets.send(flow, echo_addr, format!("d{i}").as_bytes());
        }
        let mut buf = [0; 64];
        for _ in 0..count {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            echo.send_to(&buf[..n], from).unwrap();
        }
        let seen = events(&mut sockets, count).await;
        let expected: Vec<_> = (0..count)
            .map(|i| {
                let payload = format!("d{i}");
                let event = UdpEvent::Datagram {
                    from: echo_addr,
                    payload: payload.as_bytes(),
                };
                (flow, format!("{event:?}"))
            })
            .collect();
        assert_eq!(seen, expected);

        drop(echo);
        sockets.send(flow, echo_addr, b"anyone?");
        let seen = events(&mut sockets, 1).await;
        let unreachable = UdpEvent::Unreachable {
            dest: echo_addr,
            why: IcmpError::PortUnreachable,
        };
        assert_eq!(seen, [(flow, format!("{unreachable:?}"))]);
    }
}
