//! Host ICMP echo ("ping") sockets for the router's forwarded echo requests.
//!
//! Unprivileged ICMP datagram sockets are the first choice: the kernel
//! gives each one an echo identifier of its own, fills in checksums, and
//! delivers only the replies meant for it. Linux allows them to the groups
//! in `net.ipv4.ping_group_range` (which covers ICMPv6 too). When they are
//! not allowed, raw sockets are used if the process may open them (root or
//! CAP_NET_RAW); each raw socket then uses an identifier of its own and
//! filters the replies, since it sees every ICMP message to the host. When
//! neither works, opening fails and the router forgets the identity; a
//! warning at startup says how to enable ping sockets.
//!
//! Like UDP sockets ([`super::udp`]), echo sockets have no task: the router
//! task services a flow whose socket turned readable ([`super::ready`]),
//! reading up to [`MAX_MESSAGES`] messages into one shared buffer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::task::{Context, Poll};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::ready::{DueFlows, SocketWaker, read_until_blocked};
use crate::core::FlowId;

/// Most messages read from one socket in one service.
const MAX_MESSAGES: usize = 32;
/// The largest ICMP message (with the IP header, on raw IPv4 sockets).
const MAX_MESSAGE: usize = 65535;

/// ICMPv4 echo reply type (smoltcp builds the requests).
const ECHO_REPLY_V4: u8 = 0;
/// ICMPv6 echo request and reply types.
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// ICMP echo header: type, code, checksum, identifier, sequence number.
const ECHO_HEADER: usize = 8;

/// How a socket was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An unprivileged ICMP datagram socket: the kernel owns the identifier.
    Ping,
    /// A raw socket: we own the identifier, and must filter replies.
    Raw { ident: u16 },
}

struct EchoSocket {
    socket: AsyncFd<Socket>,
    kind: Kind,
    ipv6: bool,
    waker: SocketWaker,
}

/// An echo reply that arrived on a flow's socket.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct EchoReply<'a> {
    /// Who answered.
    pub(super) from: IpAddr,
    /// The request's sequence number.
    pub(super) seq_no: u16,
    /// The echoed data.
    pub(super) payload: &'a [u8],
}

/// The open echo sockets of one router shard, by flow.
pub(super) struct EchoSockets {
    sockets: HashMap<FlowId, EchoSocket>,
    due: DueFlows,
    buf: Box<[u8]>,
    /// This shard's index and the number of shards: raw sockets'
    /// identifiers interleave, since every shard numbers its flows from 0.
    shard: (usize, usize),
}

impl EchoSockets {
    /// The socket table of shard `index` of `count`. The first shard checks
    /// at once which kind of ICMP socket this process may open
    /// ([`check_sockets`]).
    pub(super) fn new(index: usize, count: usize) -> Self {
        if index == 0 {
            check_sockets();
        }
        EchoSockets {
            sockets: HashMap::new(),
            due: DueFlows::default(),
            buf: vec![0; MAX_MESSAGE].into_boxed_slice(),
            shard: (index, count.max(1)),
        }
    }

    /// Opens the socket of `flow`.
    pub(super) fn open(&mut self, flow: FlowId, ipv6: bool) -> io::Result<()> {
        let (socket, kind) = open_any(ipv6)?;
        // Raw sockets need an identifier of their own: the flow's, made
        // distinct across shards, is distinct among open sockets, which is
        // all that matters.
        let kind = match kind {
            Kind::Raw { .. } => {
                let (index, count) = self.shard;
                Kind::Raw {
                    ident: (flow.0 * count as u64 + index as u64) as u16,
                }
            }
            ping => ping,
        };
        // SAFETY: a `Socket` owns its descriptor and keeps it open, the
        // same one, until it is dropped with the `AsyncFd`.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let waker = self.due.waker(flow);
        self.sockets.insert(
            flow,
            EchoSocket {
                socket,
                kind,
                ipv6,
                waker,
            },
        );
        // The first service registers the wait for replies.
        self.due.push(flow);
        Ok(())
    }

    /// Sends an echo request to `dest` from the socket of `flow`, if it can
    /// go now.
    pub(super) fn send(&mut self, flow: FlowId, dest: IpAddr, seq_no: u16, data: &[u8]) {
        let Some(echo) = self.sockets.get(&flow) else {
            return;
        };
        if dest.is_ipv6() != echo.ipv6 {
            return;
        }
        let ident = match echo.kind {
            Kind::Ping => 0,
            Kind::Raw { ident } => ident,
        };
        let message = echo_request(echo.ipv6, ident, seq_no, data);
        let dest_addr = SocketAddr::new(dest, 0).into();
        if let Err(error) = echo.socket.get_ref().send_to(&message, &dest_addr) {
            tracing::debug!(flow = flow.0, %dest, %error, "echo request send failed");
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

    /// Services every flow due now, once, and reports the echo replies
    /// that arrived with `report`: at most [`MAX_MESSAGES`] messages per
    /// flow, and `budget` in all (decreased by what was read). A flow that
    /// had more waiting stays due. Returns whether any flow was due.
    pub(super) fn service(
        &mut self,
        budget: &mut usize,
        mut report: impl FnMut(FlowId, EchoReply<'_>),
    ) -> bool {
        let (sockets, buf) = (&self.sockets, &mut self.buf);
        self.due.service_each(|flow| match sockets.get(&flow) {
            Some(echo) => service_one(flow, echo, buf, budget, &mut report),
            None => true,
        })
    }
}

/// Reads what waits on the socket of `flow`, up to [`MAX_MESSAGES`] and
/// `budget`, and reports the echo replies among it. Returns false if it
/// stopped at a bound, with more perhaps waiting.
fn service_one(
    flow: FlowId,
    echo: &EchoSocket,
    buf: &mut [u8],
    budget: &mut usize,
    report: &mut impl FnMut(FlowId, EchoReply<'_>),
) -> bool {
    let waker = echo.waker.rearm();
    let mut cx = Context::from_waker(&waker);
    read_until_blocked(
        &echo.socket,
        &mut cx,
        MAX_MESSAGES,
        budget,
        |socket| match recv_message(socket, buf) {
            Ok((len, from)) => {
                if let Some((seq_no, payload)) = parse_reply(&buf[..len], echo.kind, echo.ipv6) {
                    let from = from.ip();
                    report(
                        flow,
                        EchoReply {
                            from,
                            seq_no,
                            payload,
                        },
                    );
                }
                Ok(true)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Err(error),
            Err(error) => {
                tracing::debug!(flow = flow.0, %error, "ICMP receive error");
                Ok(false)
            }
        },
    )
}

/// Logs which kind of ICMP socket this process may open, and warns if
/// neither, saying how to fix it.
fn check_sockets() {
    match open_any(false) {
        Ok((_, Kind::Ping)) => tracing::debug!("pings are forwarded through ping sockets"),
        Ok((_, Kind::Raw { .. })) => {
            tracing::info!("ping sockets are not allowed; pings are forwarded through raw sockets")
        }
        Err(error) => tracing::warn!(
            %error,
            "cannot open an ICMP socket, so pings through the gateway go unanswered; \
             allow ping sockets with `sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"`"
        ),
    }
}

/// A ping socket if allowed, else a raw socket (with identifier 0, for the
/// caller to replace). The error is the ping socket's, which names the
/// usual fix.
fn open_any(ipv6: bool) -> io::Result<(Socket, Kind)> {
    match open_socket(ipv6, Type::DGRAM) {
        Ok(socket) => Ok((socket, Kind::Ping)),
        Err(ping_error) => open_socket(ipv6, Type::RAW)
            .map(|socket| (socket, Kind::Raw { ident: 0 }))
            .map_err(|_| ping_error),
    }
}

fn open_socket(ipv6: bool, kind: Type) -> io::Result<Socket> {
    let (domain, protocol, addr) = if ipv6 {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        (Domain::IPV6, Protocol::ICMPV6, addr)
    } else {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        (Domain::IPV4, Protocol::ICMPV4, addr)
    };
    let socket = Socket::new(domain, kind.nonblocking(), Some(protocol))?;
    if kind == Type::DGRAM {
        // Binding a ping socket is what assigns its identifier.
        socket.bind(&addr.into())?;
    }
    Ok(socket)
}

/// An echo request message (ICMP header and data). The kernel fills in the
/// identifier of ping sockets, and the checksum of every ICMPv6 socket; the
/// ICMPv4 checksum is computed here for raw sockets.
fn echo_request(ipv6: bool, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let mut message = vec![0; ECHO_HEADER + data.len()];
    if ipv6 {
        message[0] = ECHO_REQUEST_V6;
        message[4..6].copy_from_slice(&ident.to_be_bytes());
        message[6..8].copy_from_slice(&seq_no.to_be_bytes());
        message[ECHO_HEADER..].copy_from_slice(data);
    } else {
        let repr = Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        };
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut message[..]),
            &ChecksumCapabilities::default(),
        );
    }
    message
}

/// The sequence number and data of an echo reply received on a socket of
/// `kind`, or `None` if the message is something else (raw sockets see
/// every ICMP message to the host).
fn parse_reply(buf: &[u8], kind: Kind, ipv6: bool) -> Option<(u16, &[u8])> {
    let message = match (kind, ipv6) {
        // A raw IPv4 socket hands over the IP header too.
        (Kind::Raw { .. }, false) => {
            let header_len = usize::from(buf.first()? & 0x0f) * 4;
            buf.get(header_len..)?
        }
        _ => buf,
    };
    if message.len() < ECHO_HEADER {
        return None;
    }
    let reply_type = if ipv6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if message[0] != reply_type || message[1] != 0 {
        return None;
    }
    if let Kind::Raw { ident } = kind
        && u16::from_be_bytes([message[4], message[5]]) != ident
    {
        return None;
    }
    let seq_no = u16::from_be_bytes([message[6], message[7]]);
    Some((seq_no, &message[ECHO_HEADER..]))
}

/// Receives the next message into `buf`, which holds the largest: ping
/// sockets do not report a message's real length (as UDP sockets do with
/// MSG_TRUNC).
fn recv_message(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    use nix::sys::socket::{SockaddrStorage, recvfrom};

    let (len, from) = recvfrom::<SockaddrStorage>(socket.as_raw_fd(), buf)?;
    let from = from
        .as_ref()
        .and_then(super::udp::socket_addr)
        .ok_or_else(|| io::Error::other("message without a source address"))?;
    Ok((len, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo reply as the kernel hands it to a ping socket.
    fn reply(ipv6: bool, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
        let mut message = echo_request(ipv6, ident, seq_no, data);
        message[0] = if ipv6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
        message
    }

    /// An echo request to the loopback address, v4 and v6, comes back
    /// through the service with its sequence number and data.
    #[tokio::test]
    async fn echo_replies_reach_the_router() {
        let mut sockets = EchoSockets::new(0, 1);
        for (flow, dest) in [(FlowId(1), "127.0.0.1"), (FlowId(2), "::1")] {
            let dest: IpAddr = dest.parse().unwrap();
            if let Err(error) = sockets.open(flow, dest.is_ipv6()) {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true");
                assert!(!ci, "cannot open an ICMP socket under CI: {error}");
                eprintln!("SKIPPING echo_replies_reach_the_router: no ICMP socket: {error}");
                return;
            }
            sockets.send(flow, dest, 7, b"ping");
            let mut seen = Vec::new();
            let mut unlimited = usize::MAX;
            let wait = async {
                while seen.is_empty() {
                    std::future::poll_fn(|cx| sockets.poll_due(cx)).await;
                    sockets.service(&mut unlimited, |flow, reply| {
                        seen.push((flow, format!("{reply:?}")))
                    });
                }
            };
            let waited = tokio::time::timeout(std::time::Duration::from_secs(10), wait).await;
            assert!(waited.is_ok(), "no echo reply from {dest}");
            let expected = EchoReply {
                from: dest,
                seq_no: 7,
                payload: b"ping",
            };
            assert_eq!(seen, [(flow, format!("{expected:?}"))]);
        }
    }

    #[test]
    fn ping_sockets_take_any_identifier() {
        for ipv6 in [false, true] {
            let message = reply(ipv6, 77, 5, b"data");
            assert_eq!(
                parse_reply(&message, Kind::Ping, ipv6),
                Some((5, &b"data"[..]))
            );
        }
    }

    #[test]
    fn raw_sockets_take_only_their_identifier() {
        let message = reply(true, 77, 5, b"data");
        assert_eq!(
            parse_reply(&message, Kind::Raw { ident: 77 }, true),
            Some((5, &b"data"[..]))
        );
        assert_eq!(parse_reply(&message, Kind::Raw { ident: 78 }, true), None);
    }

    #[test]
    fn raw_ipv4_replies_skip_the_ip_header() {
        let message = reply(false, 9, 1, b"x");
        let mut datagram = vec![0x45; 1];
        datagram.extend_from_slice(&[0; 19]);
        datagram.extend_from_slice(&message);
        assert_eq!(
            parse_reply(&datagram, Kind::Raw { ident: 9 }, false),
            Some((1, &b"x"[..]))
        );
    }

    #[test]
    fn other_messages_and_short_buffers_are_ignored() {
        let request = echo_request(false, 1, 1, b"");
        assert_eq!(parse_reply(&request, Kind::Ping, false), None);
        assert_eq!(parse_reply(&[0; 3], Kind::Ping, false), None);
        assert_eq!(parse_reply(&[], Kind::Raw { ident: 1 }, false), None);
    }
}
