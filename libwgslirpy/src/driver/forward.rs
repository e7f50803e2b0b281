//! The HOST sockets of reverse forwards: UDP (`-u`) and TCP (`-t`).
//!
//! Each forward's socket is bound at startup, so a port in use is an error
//! before the gateway runs. A reader task per socket hands every datagram to
//! the router task of the shard that owns the forward (the shard of its
//! DEST, [`Shards::of_endpoint`](crate::core::shard::Shards::of_endpoint));
//! replies are sent without waiting ([`ForwardReplies`]), and dropped if the
//! socket cannot take them at once. Accepted `-t` connections go to the
//! shard of their forward's DEST the same way.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::HostEvent;
use crate::config::Forward;

/// The largest UDP payload a socket can receive.
const MAX_DATAGRAM: usize = 65535;

/// The bound HOST sockets, in the order of the `-u` list.
pub(super) struct UdpForwards {
    sockets: Vec<Arc<UdpSocket>>,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for UdpForwards {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

impl UdpForwards {
    /// Binds every forward's HOST address. Fails on the first that cannot
    /// be bound, naming it.
    pub(super) fn bind(forwards: &[Forward]) -> Result<Self, (SocketAddr, io::Error)> {
        let sockets = forwards
            .iter()
            .map(|forward| {
                bind(forward.host)
                    .map(Arc::new)
                    .map_err(|e| (forward.host, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (forward, socket) in forwards.iter().zip(&sockets) {
            tracing::info!(
                host = %socket.local_addr().unwrap_or(forward.host),
                dest = %forward.dest,
                "forwarding UDP into the tunnel"
            );
        }
        Ok(UdpForwards {
            sockets,
            readers: Vec::new(),
        })
    }

    /// Starts the readers; forward `i` reports to `events_of(i)`.
    pub(super) fn start(&mut self, events_of: impl Fn(usize) -> mpsc::Sender<HostEvent>) {
        self.readers = self
            .sockets
            .iter()
            .enumerate()
            .map(|(forward, socket)| {
                tokio::spawn(read_datagrams(forward, socket.clone(), events_of(forward)))
            })
            .collect();
    }

    /// The way the routers send replies out of these sockets.
    pub(super) fn replies(&self) -> ForwardReplies {
        ForwardReplies(self.sockets.clone())
    }

    /// Stops receiving (shutdown). The sockets close when the last
    /// [`ForwardReplies`] is dropped with its router task.
    pub(super) fn close(&mut self) {
        for reader in self.readers.drain(..) {
            reader.abort();
        }
        self.sockets.clear();
    }
}

/// A router task's way out of the HOST sockets of the reverse UDP forwards,
/// for replies.
pub(super) struct ForwardReplies(Vec<Arc<UdpSocket>>);

impl ForwardReplies {
    /// Sends `payload` from the HOST socket of `forward` to `to`, if it can
    /// go now.
    pub(super) fn send(&self, forward: usize, to: SocketAddr, payload: &[u8]) {
        let Some(socket) = self.0.get(forward) else {
            return;
        };
        // A dual-stack socket reaches IPv4 senders at their mapped address.
        let to = match to {
            SocketAddr::V4(v4) if socket.local_addr().is_ok_and(|a| a.is_ipv6()) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            other => other,
        };
        let socket = socket2::SockRef::from(&**socket);
        if let Err(error) = socket.send_to(payload, &to.into()) {
            tracing::debug!(forward, %to, %error, "reverse UDP reply dropped");
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]:PORT` takes IPv4 senders too, as the user would expect.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

async fn read_datagrams(forward: usize, socket: Arc<UdpSocket>, events: mpsc::Sender<HostEvent>) {
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                let event = HostEvent::ForwardDatagram {
                    forward,
                    from,
                    payload: Bytes::copy_from_slice(&buf[..len]),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::debug!(forward, %error, "reverse UDP receive error"),
        }
    }
}

/// The listening HOST sockets of reverse TCP forwards (`-t`), in the order
/// of the `-t` list.
///
/// Each is bound at startup, so a port in use is an error before the
/// gateway runs. A task per socket accepts connections and hands each to
/// the router task, waiting when the event channel is full (the kernel's
/// accept queue holds the rest). The router decides whether a connection is
/// taken (`--max-tcp-connections`): if not, it is reset.
pub(super) struct TcpForwards {
    listeners: Vec<TcpListener>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Drop for TcpForwards {
    fn drop(&mut self) {
        for acceptor in &self.acceptors {
            acceptor.abort();
        }
    }
}

/// Pause after an accept error (out of descriptors, say), so that a
/// persistent one does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one accept-error line per this long, per forward.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Length of each HOST socket's accept queue.
const LISTEN_BACKLOG: i32 = 1024;

impl TcpForwards {
    /// Binds and listens on every forward's HOST address. Fails on the
    /// first that cannot be bound, naming it.
    pub(super) fn bind(forwards: &[Forward]) -> Result<Self, (SocketAddr, io::Error)> {
        let listeners = forwards
            .iter()
            .map(|forward| listen(forward.host).map_err(|e| (forward.host, e)))
            .collect::<Result<Vec<_>, _>>()?;
        for (forward, listener) in forwards.iter().zip(&listeners) {
            tracing::info!(
                host = %listener.local_addr().unwrap_or(forward.host),
                dest = %forward.dest,
                "forwarding TCP into the tunnel"
            );
        }
        Ok(TcpForwards {
            listeners,
            acceptors: Vec::new(),
        })
    }

    /// Stops accepting and closes the listening sockets (shutdown).
    /// Connections already accepted are the router's.
    pub(super) fn close(&mut self) {
        for acceptor in self.acceptors.drain(..) {
            acceptor.abort();
        }
        self.listeners.clear();
    }

    /// Starts accepting; forward `i`'s connections are reported to
    /// `events_of(i)`.
    pub(super) fn start(&mut self, events_of: impl Fn(usize) -> mpsc::Sender<HostEvent>) {
        self.acceptors = std::mem::take(&mut self.listeners)
            .into_iter()
            .enumerate()
            .map(|(forward, listener)| {
                tokio::spawn(accept_connections(forward, listener, events_of(forward)))
            })
            .collect();
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]:PORT` takes IPv4 clients too, as the user would expect.
        socket.set_only_v6(false)?;
    }
    // Lets a restarted gateway listen again while old connections linger in
    // TIME-WAIT; on Linux it never lets two sockets listen on one port.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

async fn accept_connections(
    forward: usize,
    listener: TcpListener,
    events: mpsc::Sender<HostEvent>,
) {
    let mut last_log: Option<Instant> = None;
    let mut errors = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let event = HostEvent::TcpAccepted {
                    forward,
                    stream,
                    client,
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                errors += 1;
                if last_log.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::warn!(forward, %error, errors, "cannot accept on a -t HOST socket");
                    last_log = Some(Instant::now());
                    errors = 0;
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}
