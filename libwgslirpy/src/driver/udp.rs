//! Host UDP sockets for the router's UDP flows.
//!
//! Each flow gets one socket bound to an ephemeral port on the unspecified
//! address of its family (IPv6 sockets are v6-only), and one reader task
//! that forwards every datagram to the router task. Sends never wait: a
//! datagram that the socket cannot take at once is dropped, as a congested
//! router drops it. Closing a flow aborts its reader and closes the socket.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::HostEvent;
use crate::core::FlowId;

/// The largest UDP payload a socket can receive.
const MAX_DATAGRAM: usize = 65535;

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
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

async fn read_datagrams(flow: FlowId, socket: Arc<UdpSocket>, events: mpsc::Sender<HostEvent>) {
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((len, from)) => {
                let event = HostEvent::UdpDatagram {
                    flow,
                    from,
                    payload: Bytes::copy_from_slice(&buf[..len]),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::debug!(flow = flow.0, %error, "UDP receive error");
            }
        }
    }
}
