//! Host TCP sockets for the router's TCP connections.
//!
//! The router task does every TCP socket call itself; there is no task per
//! connection. Each socket has a waker of its own ([`super::ready`]) that
//! tokio's reactor calls when the socket turns readable or writable: it
//! puts the flow on a shared ready list and wakes the router task. The
//! router task then *services* the flow ([`TcpSockets::service`]), without
//! blocking: it finishes a connect, writes the pending bytes (vectored), and
//! reads within the credit, reporting each outcome to the core at once. A
//! flow is also serviced right after the core asked something of it (bytes
//! to write, more credit, a shutdown), so a write goes out in the same
//! wake-up that received it from the peer.
//!
//! Why not a task per socket: every hand-off between the router task and a
//! flow's task was a wake-up, often of another thread, and an event on a
//! channel. Servicing sockets in place removes both from the per-segment
//! path, and an idle connection costs a socket, its registration and a small
//! entry here, with no task and no buffer.
//!
//! - Writes: what the socket does not take stays in the flow's pending list
//!   (bounded by the core's `--tcp-buffer-size`), and the flow waits for
//!   writability. The bytes come as views of the packets from the tunnel,
//!   whose buffers (4 KiB, for 1.4 KB of data) the tunnel's pool takes
//!   back once nothing views them; what has to wait is copied out once
//!   ([`Pending::keep`]), so a blocked socket holds its bytes, not buffers.
//! - Reads: only while the core has granted credit
//!   ([`SocketAction::TcpRead`]), so a slow peer leaves the bytes in the
//!   kernel and the host's sender blocks. One read of at most [`MAX_READ`]
//!   bytes per flow per service, so a busy flow cannot starve the others,
//!   straight into the connection's send buffer in the core
//!   ([`TcpEvent::Readable`], `Router::handle_tcp_read`): no copy between.
//!
//! [`SocketAction::TcpRead`]: crate::core::SocketAction::TcpRead

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut, Bytes};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpStream;

use super::ready::{DueFlows, SocketWaker};
use crate::core::{ConnectError, FlowId};

/// Most bytes read from one socket in one service.
const MAX_READ: usize = 64 * 1024;
/// Most buffers written in one vectored write.
const MAX_IOV: usize = 64;
/// At most one "out of sockets" line per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What servicing a flow found, for the core.
#[derive(Debug)]
pub(super) enum TcpEvent<'a, 'b> {
    /// The connect finished.
    Connected,
    /// The connect failed; the socket is gone.
    ConnectFailed(ConnectError),
    /// The flow has credit: the core reads what is there into its buffer
    /// ([`HostRead::read_into`]).
    Readable(&'a mut HostRead<'b>),
    /// The host side shut down its writing.
    Eof,
    /// The socket took this many more pending bytes.
    Written(usize),
    /// The socket failed or was reset; it is gone.
    Error,
}

/// One connection's socket and what the core asked of it.
struct Flow {
    stream: TcpStream,
    waker: SocketWaker,
    connecting: bool,
    /// Bytes to write, in order.
    pending: Pending,
    /// Bytes the core lets us read.
    credit: usize,
    /// False once the host side's end of stream was read.
    reading: bool,
    /// `shutdown(Write)` once `pending` is empty.
    shutdown: bool,
}

/// The open TCP sockets, by flow.
pub(super) struct TcpSockets {
    flows: HashMap<FlowId, Flow>,
    due: DueFlows,
    no_socket_log: Option<Instant>,
    no_socket_count: u64,
}

impl TcpSockets {
    pub(super) fn new() -> Self {
        TcpSockets {
            flows: HashMap::new(),
            due: DueFlows::default(),
            no_socket_log: None,
            no_socket_count: 0,
        }
    }

    /// Makes the socket of `flow` and starts connecting it to `dest`. An
    /// error means there is no socket. `Connected` means the connect has
    /// finished already (a destination on this host answers within the
    /// `connect()` call); otherwise servicing the flow reports the outcome.
    pub(super) fn connect(
        &mut self,
        flow: FlowId,
        dest: SocketAddr,
    ) -> Result<Connect, ConnectError> {
        let stream = match start_connect(dest) {
            Ok(stream) => stream,
            Err(error) => {
                let kind = classify(&error);
                if kind == ConnectError::NoResources {
                    self.log_no_socket(&error);
                } else {
                    tracing::debug!(flow = flow.0, %dest, %error, "TCP connect failed at once");
                }
                return Err(kind);
            }
        };
        // Connected if the peer's address is known and no error is pending.
        let connected = stream.peer_addr().is_ok() && matches!(stream.take_error(), Ok(None));
        self.insert(flow, stream, !connected);
        if connected {
            Ok(Connect::Connected)
        } else {
            // Servicing it registers the wait for the connect.
            self.due.push(flow);
            Ok(Connect::Pending)
        }
    }

    /// Takes over `stream`, accepted on a reverse forward's HOST socket, as
    /// the socket of `flow`: nothing is read before the core grants credit.
    pub(super) fn adopt(&mut self, flow: FlowId, stream: TcpStream) {
        // The peer's stack already decides segment sizes and timing.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(flow = flow.0, %error, "cannot set TCP_NODELAY");
        }
        self.insert(flow, stream, false);
    }

    fn insert(&mut self, flow: FlowId, stream: TcpStream, connecting: bool) {
        self.flows.insert(
            flow,
            Flow {
                stream,
                waker: self.due.waker(flow),
                connecting,
                pending: Pending::default(),
                credit: 0,
                reading: true,
                shutdown: false,
            },
        );
    }

    fn log_no_socket(&mut self, error: &io::Error) {
        self.no_socket_count += 1;
        let now = Instant::now();
        if self
            .no_socket_log
            .is_none_or(|last| now.duration_since(last) >= LOG_INTERVAL)
        {
            tracing::warn!(
                %error,
                refused = self.no_socket_count,
                "cannot make a TCP socket: new connections get RST (raise the open-file limit?)"
            );
            self.no_socket_log = Some(now);
            self.no_socket_count = 0;
        }
    }

    /// Queues `data` for the socket of `flow`.
    pub(super) fn write(&mut self, flow: FlowId, data: Bytes) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.pending.bytes.push_back(data);
            self.due.push(flow);
        }
    }

    /// Lets the socket of `flow` read `max` more bytes.
    pub(super) fn read(&mut self, flow: FlowId, max: usize) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.credit += max;
            self.due.push(flow);
        }
    }

    /// Half-closes the socket of `flow` once its pending bytes are written.
    pub(super) fn shutdown_write(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.shutdown = true;
            self.due.push(flow);
        }
    }

    /// Closes the socket of `flow`.
    pub(super) fn close(&mut self, flow: FlowId) {
        self.flows.remove(&flow);
    }

    /// Closes the socket of `flow` with a RST.
    pub(super) fn abort(&mut self, flow: FlowId) {
        if let Some(f) = self.flows.remove(&flow) {
            let _ = SockRef::from(&f.stream).set_linger(Some(Duration::ZERO));
        }
    }

    /// Ready when some flow is due for service: the reactor found its socket
    /// ready, or the core asked something of it.
    pub(super) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.due.poll(cx)
    }

    /// Services every flow due now, once, and reports what happened with
    /// `report`. Flows that become due meanwhile (through `report`'s calls
    /// into the core, or a read that may have left more) wait for the next
    /// call. Returns whether any flow was due.
    pub(super) fn service(&mut self, mut report: impl FnMut(FlowId, TcpEvent<'_, '_>)) -> bool {
        let flows = &mut self.flows;
        self.due
            .service_each(|flow| service_one(flows, flow, &mut report))
    }
}

/// Services the socket of `flow`: finishes its connect, or moves its bytes.
/// Returns false if a read may have left more waiting.
fn service_one(
    flows: &mut HashMap<FlowId, Flow>,
    flow: FlowId,
    report: &mut impl FnMut(FlowId, TcpEvent<'_, '_>),
) -> bool {
    let Some(f) = flows.get_mut(&flow) else {
        return true;
    };
    let waker = f.waker.rearm();
    let mut cx = Context::from_waker(&waker);
    if f.connecting {
        match poll_connect(&f.stream, &mut cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => {
                f.connecting = false;
                // The core answers a connect with credit, which makes the
                // flow due again.
                report(flow, TcpEvent::Connected);
            }
            Poll::Ready(Err(error)) => {
                tracing::debug!(flow = flow.0, %error, "TCP connect failed");
                flows.remove(&flow);
                report(flow, TcpEvent::ConnectFailed(classify(&error)));
            }
        }
        return true;
    }
    match move_bytes(f, &mut cx, flow, report) {
        Ok(drained) => drained,
        Err(error) => {
            tracing::debug!(flow = flow.0, %error, "TCP socket error");
            flows.remove(&flow);
            report(flow, TcpEvent::Error);
            true
        }
    }
}

/// Writes what is pending, shuts down if asked, and reads once within the
/// credit. Returns false if the read may have left more waiting.
fn move_bytes(
    f: &mut Flow,
    cx: &mut Context<'_>,
    flow: FlowId,
    report: &mut impl FnMut(FlowId, TcpEvent<'_, '_>),
) -> io::Result<bool> {
    if !f.pending.bytes.is_empty() {
        let written = write_pending(&f.stream, &mut f.pending, cx)?;
        if written > 0 {
            report(flow, TcpEvent::Written(written));
        }
        if f.pending.bytes.is_empty() && f.pending.bytes.capacity() > 4 {
            f.pending = Pending::default();
        }
        f.pending.keep();
    }
    if f.shutdown && f.pending.bytes.is_empty() {
        f.shutdown = false;
        if let Err(error) = SockRef::from(&f.stream).shutdown(std::net::Shutdown::Write) {
            tracing::debug!(flow = flow.0, %error, "TCP shutdown failed");
        }
    }
    if f.reading && f.credit > 0 {
        let mut read = HostRead {
            stream: &f.stream,
            waker: cx.waker(),
            max: f.credit.min(MAX_READ),
            outcome: None,
        };
        report(flow, TcpEvent::Readable(&mut read));
        match read.outcome {
            // The core takes no bytes now (its connection has stopped
            // reading): none are read until it grants credit again.
            None => f.credit = 0,
            Some(outcome) => match outcome? {
                None => {}
                Some(0) => {
                    f.reading = false;
                    report(flow, TcpEvent::Eof);
                }
                Some(n) => {
                    f.credit = f.credit.saturating_sub(n);
                    // More may be waiting; the next service finds out (and
                    // waits for readability if not).
                    return Ok(false);
                }
            },
        }
    }
    Ok(true)
}

/// A flow's socket with credit to read, lent to the core to read from into
/// its own buffer.
#[derive(Debug)]
pub(super) struct HostRead<'a> {
    stream: &'a TcpStream,
    /// Woken when the socket turns readable, if the read finds nothing.
    waker: &'a Waker,
    max: usize,
    /// What the read found, once the core made it.
    outcome: Option<io::Result<Option<usize>>>,
}

impl HostRead<'_> {
    /// The most bytes to read: the credit, and at most [`MAX_READ`].
    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Reads once into `room` (which must have room for a byte at least:
    /// reading into none would look like the end of the stream).
    pub(super) fn read_into(&mut self, room: &mut dyn BufMut) {
        debug_assert!(room.has_remaining_mut());
        let mut cx = Context::from_waker(self.waker);
        self.outcome = Some(read_once(self.stream, room, &mut cx));
    }
}

/// How far a connect got within the `connect()` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Connect {
    /// Connected already: tell the router now.
    Connected,
    /// Still going: servicing the flow reports the outcome.
    Pending,
}

/// Closes `stream` with a RST (`SO_LINGER` 0): a connection the router
/// refused.
pub(super) fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// A non-blocking socket with its connect started.
fn start_connect(dest: SocketAddr) -> io::Result<TcpStream> {
    // Non-blocking from the start: two `fcntl` calls fewer per connection.
    let socket = Socket::new(
        Domain::for_address(dest),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if dest.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // The peer's stack already decides segment sizes and timing.
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&dest.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    TcpStream::from_std(socket.into())
}

/// What the peer should be told about a failed connect.
fn classify(error: &io::Error) -> ConnectError {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused,
        io::ErrorKind::NetworkUnreachable => ConnectError::NetUnreachable,
        io::ErrorKind::HostUnreachable => ConnectError::HostUnreachable,
        io::ErrorKind::TimedOut => ConnectError::TimedOut,
        io::ErrorKind::OutOfMemory => ConnectError::NoResources,
        _ => match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                ConnectError::NoResources
            }
            _ => ConnectError::Other,
        },
    }
}

/// Whether the connect has finished, and how; registers `cx` if not.
fn poll_connect(stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    match stream.poll_write_ready(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        Poll::Ready(Ok(())) => Poll::Ready(match stream.take_error() {
            Ok(Some(error)) | Err(error) => Err(error),
            Ok(None) => stream.peer_addr().map(|_| ()),
        }),
    }
}

/// The bytes waiting for a socket to take them.
#[derive(Default)]
struct Pending {
    /// In stream order.
    bytes: VecDeque<Bytes>,
    /// How many of the first are copies of our own ([`Pending::keep`]).
    kept: usize,
}

impl Pending {
    /// Copies out what waits and is not yet a copy, once: a view would keep
    /// a whole packet buffer of the tunnel's pool alive while the socket is
    /// blocked. Bytes that the socket takes in the wake-up that brought them
    /// are never copied.
    fn keep(&mut self) {
        for bytes in self.bytes.iter_mut().skip(self.kept) {
            *bytes = Bytes::copy_from_slice(bytes);
        }
        self.kept = self.bytes.len();
    }

    /// Drops the first entry, written.
    fn pop_front(&mut self) {
        self.bytes.pop_front();
        self.kept = self.kept.saturating_sub(1);
    }
}

/// Writes as much of `pending` as the socket takes; registers `cx` for
/// writability if some is left. Returns the bytes written.
fn write_pending(
    stream: &TcpStream,
    pending: &mut Pending,
    cx: &mut Context<'_>,
) -> io::Result<usize> {
    let mut total = 0;
    while !pending.bytes.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, bytes) in slices.iter_mut().zip(pending.bytes.iter()) {
            *slot = IoSlice::new(bytes);
            count += 1;
        }
        let mut n = match stream.try_write_vectored(&slices[..count]) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Not writable any more: wait for room, unless it came back.
                match stream.poll_write_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(error)) => return Err(error),
                }
            }
            Err(error) => return Err(error),
        };
        total += n;
        while n > 0 {
            let Some(front) = pending.bytes.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                pending.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(total)
}

/// Reads once into `buf`: `Some(0)` at end of stream, `None` if nothing is
/// there now (and `cx` is registered for readability).
fn read_once(
    stream: &TcpStream,
    mut buf: &mut dyn BufMut,
    cx: &mut Context<'_>,
) -> io::Result<Option<usize>> {
    loop {
        match stream.try_read_buf(&mut buf) {
            Ok(n) => return Ok(Some(n)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                match stream.poll_read_ready(cx) {
                    Poll::Pending => return Ok(None),
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(error)) => return Err(error),
                }
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting bytes are copied out of the packet they view, each once.
    #[test]
    fn what_waits_is_copied_out_once() {
        let packet = Bytes::from(vec![7u8; 4096]);
        let inside = |bytes: &Bytes| packet.as_ptr_range().contains(&bytes.as_ptr());
        let mut pending = Pending::default();
        pending.bytes.push_back(packet.slice(100..1500));
        pending.keep();
        assert!(!inside(&pending.bytes[0]));
        let kept = pending.bytes[0].as_ptr();
        pending.bytes.push_back(packet.slice(1500..2900));
        pending.keep();
        assert_eq!(pending.bytes[0].as_ptr(), kept, "copied once");
        assert!(!inside(&pending.bytes[1]));
        assert_eq!(&pending.bytes[1][..], &packet[1500..2900]);
        pending.pop_front();
        assert_eq!(pending.kept, 1);
    }

    /// Services the sockets until `want` events arrived, waiting for the
    /// reactor in between.
    async fn events(sockets: &mut TcpSockets, want: usize) -> Vec<(FlowId, String)> {
        let mut seen = Vec::new();
        while seen.len() < want {
            std::future::poll_fn(|cx| sockets.poll_due(cx)).await;
            sockets.service(|flow, event| seen.extend(describe(flow, event)));
        }
        seen
    }

    /// What the core would hear of `event`; a readable socket is read into
    /// a buffer of its own, and reported as what it gave.
    fn describe(flow: FlowId, event: TcpEvent<'_, '_>) -> Option<(FlowId, String)> {
        let TcpEvent::Readable(read) = event else {
            return Some((flow, format!("{event:?}")));
        };
        let mut got = Vec::new();
        let max = read.max();
        read.read_into(&mut (&mut got).limit(max));
        let got = String::from_utf8(got).unwrap();
        (!got.is_empty()).then(|| (flow, format!("Data({got})")))
    }

    /// A destination on this host answers within `connect()`, so the router
    /// hears of it at once; a refused one is found by servicing the flow.
    #[tokio::test]
    async fn local_connect_finishes_within_the_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let mut sockets = TcpSockets::new();
        assert_eq!(sockets.connect(FlowId(1), open), Ok(Connect::Connected));

        drop(listener);
        assert_eq!(sockets.connect(FlowId(2), open), Ok(Connect::Pending));
        let seen = events(&mut sockets, 1).await;
        assert_eq!(seen, [(FlowId(2), "ConnectFailed(Refused)".to_string())]);
    }

    /// Bytes go both ways, reads stay within the credit, and end of stream
    /// and shutdown pass through.
    #[tokio::test]
    async fn bytes_move_within_credit_and_ends_pass_through() {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sockets = TcpSockets::new();
        let flow = FlowId(7);
        assert_eq!(
            sockets.connect(flow, listener.local_addr().unwrap()),
            Ok(Connect::Connected)
        );
        let (mut server, _) = listener.accept().unwrap();

        sockets.write(flow, Bytes::from_static(b"hello "));
        sockets.write(flow, Bytes::from_static(b"world"));
        sockets.shutdown_write(flow);
        assert_eq!(
            events(&mut sockets, 1).await,
            [(flow, "Written(11)".into())]
        );
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello world");

        server.write_all(b"0123456789").unwrap();
        drop(server);
        sockets.read(flow, 4);
        let seen = events(&mut sockets, 1).await;
        assert_eq!(seen, [(flow, "Data(0123)".to_string())]);
        // Nothing more is read without credit.
        let mut more = Vec::new();
        sockets.service(|flow, event| more.push(format!("{flow:?} {event:?}")));
        assert!(more.is_empty(), "{more:?}");
        sockets.read(flow, 100);
        let seen = events(&mut sockets, 2).await;
        assert_eq!(
            seen,
            [
                (flow, "Data(456789)".to_string()),
                (flow, "Eof".to_string())
            ]
        );
    }
}
