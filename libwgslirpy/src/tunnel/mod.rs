//! Tunnel transports: how IP packets travel between peers and the router.
//!
//! Two transports sit behind one interface, [`TunnelHandle`]:
//! - [`wireguard`]: gotatun's device layer, fed through an in-memory IP
//!   channel instead of a TUN device. It owns the UDP socket, handshakes,
//!   timers, cookies, roaming and allowed-IPs routing for every peer.
//! - [`rawip`]: IPv4/IPv6 packets carried bare in UDP datagrams, as Linux GUE
//!   variant 1 sends them. No authentication at all.
//!
//! A transport hands the router decrypted, source-checked IP packets on
//! `incoming`, and takes packets for peers on `outgoing`. Both channels are
//! bounded. The router must only `try_send` on `outgoing`: when the queue is
//! full the packet is dropped, as a full TUN queue would drop it, so a slow
//! tunnel never stalls the router. Dropping the handle stops the transport.

pub mod rawip;
mod uapi;
pub mod wireguard;

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::sync::mpsc;

use crate::config::Config;

/// One plain IP packet, v4 or v6, as it travels between the router and a
/// transport.
pub type IpPacket = BytesMut;

/// A running transport.
pub struct TunnelHandle {
    /// Packets from peers: decrypted, and (for WireGuard) with an inner
    /// source address within the sending peer's allowed IPs.
    pub incoming: mpsc::Receiver<IpPacket>,
    /// Packets for peers. Use `try_send` and drop on a full queue.
    pub outgoing: mpsc::Sender<IpPacket>,
    /// The local address of the tunnel's UDP socket.
    pub local_addr: SocketAddr,
    /// Keeps the transport running; dropping it stops the transport.
    _running: Running,
}

impl TunnelHandle {
    /// Stops the transport before its channels close, so that it ends
    /// cleanly instead of reporting a vanished router. Dropping the handle
    /// also stops it, but without waiting.
    pub async fn close(self) {
        match self._running {
            Running::WireGuard(running) => running.stop().await,
            Running::RawIp(_) => {}
        }
    }
}

/// What keeps a transport alive.
#[cfg_attr(not(test), expect(dead_code, reason = "held only to be dropped"))]
enum Running {
    WireGuard(wireguard::Running),
    RawIp(rawip::Running),
}

/// Why a transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The tunnel's UDP socket could not be bound.
    #[error("cannot bind the tunnel socket to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The configuration socket could not be bound.
    #[error("cannot serve the configuration socket {}", path.display())]
    Uapi {
        /// The path asked for.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The WireGuard device refused its configuration.
    #[error("WireGuard setup failed: {0}")]
    WireGuard(String),
}

/// Starts the transport that `config` describes. Must be called within a
/// tokio runtime.
pub async fn start(config: &Config) -> Result<TunnelHandle, TunnelError> {
    match &config.transport {
        crate::config::Transport::WireGuard { private_key, peers } => {
            wireguard::start(config, private_key, peers).await
        }
        crate::config::Transport::RawIp { peer_endpoint } => {
            rawip::start(config, *peer_endpoint).await
        }
    }
}
