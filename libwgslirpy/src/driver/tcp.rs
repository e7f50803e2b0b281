//! Host TCP sockets for the router's TCP connections.
//!
//! Each connection has one socket and one task. The router task makes the
//! socket and starts a non-blocking `connect()` itself, so that running out
//! of descriptors is known at once (and answered with a RST); the flow's
//! task then waits for the connect, and afterwards moves bytes both ways:
//! - writes: the router task appends the core's [`SocketAction::TcpWrite`]
//!   bytes to the flow's pending list and, once the router's outputs are
//!   drained, writes them itself ([`TcpSockets::flush_writes`]): one
//!   vectored, non-blocking write per flow per batch, reported to the core at
//!   once. Only what the socket does not take wakes the flow's task, which
//!   waits for room, writes the rest and reports it. Both write from the one
//!   pending list under its lock, so the byte order holds;
//! - reads: the core grants credit ([`SocketAction::TcpRead`]); the task
//!   reads only while it has credit, so a slow peer leaves the bytes in the
//!   kernel and the host's sender blocks.
//!
//! The router task never waits here: it only locks a flow's small shared
//! state for a moment and notifies. The tasks wait, each for itself, on the
//! shared bounded event channel. Memory per flow is what the core allows
//! (`--tcp-buffer-size` each way); an idle flow holds no buffer.
//!
//! [`SocketAction::TcpWrite`]: crate::core::SocketAction::TcpWrite
//! [`SocketAction::TcpRead`]: crate::core::SocketAction::TcpRead

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::HostEvent;
use crate::core::{ConnectError, FlowId};

/// Most bytes read in one go.
const MAX_READ: usize = 64 * 1024;
/// Most buffers written in one vectored write.
const MAX_IOV: usize = 64;
/// At most one "out of sockets" line per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the router task and a flow's task share.
#[derive(Default)]
struct Shared {
    state: Mutex<FlowState>,
    notify: Notify,
}

#[derive(Default)]
struct FlowState {
    /// Bytes to write, in order.
    pending: VecDeque<Bytes>,
    /// Bytes the task may still read.
    credit: usize,
    /// `shutdown(Write)` once `pending` is empty.
    shutdown: bool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut FlowState)) {
        if let Ok(mut state) = self.state.lock() {
            f(&mut state);
        }
        self.notify.notify_one();
    }
}

struct FlowSocket {
    stream: Arc<TcpStream>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FlowSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The open TCP sockets, by flow.
pub(super) struct TcpSockets {
    sockets: HashMap<FlowId, FlowSocket>,
    /// Flows whose pending list went from empty to not empty since the last
    /// [`TcpSockets::flush_writes`].
    unflushed: Vec<FlowId>,
    events: mpsc::Sender<HostEvent>,
    no_socket_log: Option<Instant>,
    no_socket_count: u64,
}

impl TcpSockets {
    pub(super) fn new(events: mpsc::Sender<HostEvent>) -> Self {
        TcpSockets {
            sockets: HashMap::new(),
            unflushed: Vec::new(),
            events,
            no_socket_log: None,
            no_socket_count: 0,
        }
    }

    /// Makes the socket of `flow` and starts connecting it to `dest`. An
    /// error means there is no socket. `Connected` means the connect has
    /// finished already (a destination on this host answers within the
    /// `connect()` call); otherwise the flow's task reports the outcome.
    pub(super) fn connect(
        &mut self,
        flow: FlowId,
        dest: SocketAddr,
    ) -> Result<Connect, ConnectError> {
        let stream = match start_connect(dest) {
            Ok(stream) => Arc::new(stream),
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
        self.start(flow, stream, !connected);
        Ok(if connected {
            Connect::Connected
        } else {
            Connect::Pending
        })
    }

    /// Takes over `stream`, accepted on a reverse forward's HOST socket, as
    /// the socket of `flow`: nothing is read before the core grants credit.
    pub(super) fn adopt(&mut self, flow: FlowId, stream: TcpStream) {
        // The peer's stack already decides segment sizes and timing.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(flow = flow.0, %error, "cannot set TCP_NODELAY");
        }
        self.start(flow, Arc::new(stream), false);
    }

    /// Starts the task of `flow`, which first waits for the connect if
    /// `connecting`.
    fn start(&mut self, flow: FlowId, stream: Arc<TcpStream>, connecting: bool) {
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run_flow(
            flow,
            stream.clone(),
            shared.clone(),
            self.events.clone(),
            connecting,
        ));
        self.sockets.insert(
            flow,
            FlowSocket {
                stream,
                shared,
                task,
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

    /// Queues `data` for the socket of `flow`; [`TcpSockets::flush_writes`]
    /// writes it.
    pub(super) fn write(&mut self, flow: FlowId, data: Bytes) {
        let Some(socket) = self.sockets.get(&flow) else {
            return;
        };
        let Ok(mut state) = socket.shared.state.lock() else {
            return;
        };
        if state.pending.is_empty() {
            self.unflushed.push(flow);
        }
        state.pending.push_back(data);
    }

    /// Writes what [`TcpSockets::write`] queued, as far as each socket takes
    /// it without blocking, and calls `written` with each flow's count. The
    /// flow's task waits for room for the rest.
    pub(super) fn flush_writes(&mut self, mut written: impl FnMut(FlowId, usize)) {
        for flow in self.unflushed.drain(..) {
            let Some(socket) = self.sockets.get(&flow) else {
                continue;
            };
            match write_some(&socket.stream, &socket.shared) {
                Ok(Some(Io::Written(n))) => written(flow, n),
                Ok(_) => {}
                // The task meets the same error at its next write and reports it.
                Err(error) => tracing::trace!(flow = flow.0, %error, "TCP write failed"),
            }
            // The task waits for room for whatever is left, and does a
            // shutdown that may now be due.
            let task_has_work = socket
                .shared
                .state
                .lock()
                .is_ok_and(|state| state.shutdown || !state.pending.is_empty());
            if task_has_work {
                socket.shared.notify.notify_one();
            }
        }
    }

    /// Lets the socket of `flow` read `max` more bytes.
    pub(super) fn read(&mut self, flow: FlowId, max: usize) {
        if let Some(socket) = self.sockets.get(&flow) {
            socket.shared.update(|s| s.credit += max);
        }
    }

    /// Half-closes the socket of `flow` once its pending bytes are written.
    pub(super) fn shutdown_write(&mut self, flow: FlowId) {
        if let Some(socket) = self.sockets.get(&flow) {
            socket.shared.update(|s| s.shutdown = true);
        }
    }

    /// Closes the socket of `flow`.
    pub(super) fn close(&mut self, flow: FlowId) {
        self.sockets.remove(&flow);
    }

    /// Closes the socket of `flow` with a RST.
    pub(super) fn abort(&mut self, flow: FlowId) {
        if let Some(socket) = self.sockets.remove(&flow) {
            let _ = SockRef::from(&*socket.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

/// How far a connect got within the `connect()` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Connect {
    /// Connected already: tell the router now.
    Connected,
    /// Still going: the flow's task reports the outcome.
    Pending,
}

/// Closes `stream` with a RST (`SO_LINGER` 0): a connection the router
/// refused.
pub(super) fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// A non-blocking socket with its connect started.
fn start_connect(dest: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    if dest.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
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

/// Waits for the connect to finish.
async fn finish_connect(stream: &TcpStream) -> io::Result<()> {
    stream.writable().await?;
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    stream.peer_addr().map(|_| ())
}

/// The life of one flow's socket: connect (if `connecting`), then move
/// bytes until an error, or until the router closes the flow (which aborts
/// this task).
async fn run_flow(
    flow: FlowId,
    stream: Arc<TcpStream>,
    shared: Arc<Shared>,
    events: mpsc::Sender<HostEvent>,
    connecting: bool,
) {
    // A socket accepted on a reverse forward is connected already.
    if connecting && let Err(error) = finish_connect(&stream).await {
        tracing::debug!(flow = flow.0, %error, "TCP connect failed");
        let error = classify(&error);
        let _ = events
            .send(HostEvent::TcpConnectFailed { flow, error })
            .await;
        return;
    }
    if connecting && events.send(HostEvent::TcpConnected { flow }).await.is_err() {
        return;
    }
    let mut reading = true;
    loop {
        let (want_read, want_write, shutdown) = match shared.state.lock() {
            Ok(mut state) => {
                let shutdown = state.shutdown && state.pending.is_empty();
                if shutdown {
                    state.shutdown = false;
                }
                (
                    reading && state.credit > 0,
                    !state.pending.is_empty(),
                    shutdown,
                )
            }
            Err(_) => return,
        };
        if shutdown {
            if let Err(error) = SockRef::from(stream.as_ref()).shutdown(std::net::Shutdown::Write) {
                tracing::debug!(flow = flow.0, %error, "TCP shutdown failed");
            }
            continue;
        }
        let event = tokio::select! {
            () = shared.notify.notified() => None,
            ready = stream.readable(), if want_read => Some(match ready {
                Ok(()) => read_some(&stream, &shared),
                Err(error) => Err(error),
            }),
            ready = stream.writable(), if want_write => Some(match ready {
                Ok(()) => write_some(&stream, &shared),
                Err(error) => Err(error),
            }),
        };
        let event = match event {
            None | Some(Ok(None)) => continue,
            Some(Ok(Some(event))) => event,
            Some(Err(error)) => {
                tracing::debug!(flow = flow.0, %error, "TCP socket error");
                let _ = events.send(HostEvent::TcpError { flow }).await;
                return;
            }
        };
        let event = match event {
            Io::Read(data) if data.is_empty() => {
                reading = false;
                HostEvent::TcpEof { flow }
            }
            Io::Read(data) => HostEvent::TcpData { flow, data },
            Io::Written(n) => HostEvent::TcpWritten { flow, n },
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// What one readiness turned into.
enum Io {
    /// Bytes read; empty at end of stream.
    Read(Bytes),
    /// Bytes written.
    Written(usize),
}

/// Reads within the credit. `None` if the readiness was spurious.
fn read_some(stream: &TcpStream, shared: &Shared) -> io::Result<Option<Io>> {
    let credit = shared.state.lock().map_or(0, |s| s.credit);
    let max = credit.min(MAX_READ);
    if max == 0 {
        return Ok(None);
    }
    let mut buf = BytesMut::with_capacity(max);
    match stream.try_read_buf(&mut (&mut buf).limit(max)) {
        Ok(n) => {
            if let Ok(mut state) = shared.state.lock() {
                state.credit = state.credit.saturating_sub(n);
            }
            Ok(Some(Io::Read(buf.freeze())))
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(error) => Err(error),
    }
}

/// Writes as much of the pending bytes as the socket takes.
fn write_some(stream: &TcpStream, shared: &Shared) -> io::Result<Option<Io>> {
    let Ok(mut state) = shared.state.lock() else {
        return Ok(None);
    };
    let mut total = 0;
    while !state.pending.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        for (slot, bytes) in slices.iter_mut().zip(&state.pending) {
            *slot = IoSlice::new(bytes);
            count += 1;
        }
        let mut n = match stream.try_write_vectored(&slices[..count]) {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => return Err(error),
        };
        total += n;
        while n > 0 {
            let Some(front) = state.pending.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                state.pending.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    if state.pending.is_empty() && state.pending.capacity() > 0 {
        state.pending = VecDeque::new();
    }
    Ok((total > 0).then_some(Io::Written(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination on this host answers within `connect()`, so the router
    /// hears of it without a round trip through the flow's task; a refused
    /// one is left to the task, which reports it.
    #[tokio::test]
    async fn local_connect_finishes_within_the_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let (events, mut reports) = mpsc::channel(4);
        let mut sockets = TcpSockets::new(events);
        assert_eq!(sockets.connect(FlowId(1), open), Ok(Connect::Connected));

        drop(listener);
        assert_eq!(sockets.connect(FlowId(2), open), Ok(Connect::Pending));
        match reports.recv().await {
            Some(HostEvent::TcpConnectFailed { flow, error }) => {
                assert_eq!((flow, error), (FlowId(2), ConnectError::Refused));
            }
            other => panic!("expected a refused connect, got {other:?}"),
        }
    }
}
