//! Tunnel transports: how IP packets travel between peers and the router.
//!
//! Two transports sit behind one interface, [`TunnelHandle`]:
//! - [`wireguard`]: gotatun's device layer, fed through an in-memory IP
//!   channel instead of a TUN device. It owns the UDP socket, handshakes,
//!   timers, cookies, roaming and allowed-IPs routing for every peer. Its
//!   socket sends runs of equal-sized datagrams with UDP GSO (`udp_gso`).
//! - [`rawip`]: IPv4/IPv6 packets carried bare in UDP datagrams, as Linux GUE
//!   variant 1 sends them. No authentication at all.
//!
//! Both ask the kernel for large buffers on their socket
//! ([`socket_buffers`]), so that a burst waits there instead of being lost.
//!
//! A transport hands the routers decrypted, source-checked IP packets on
//! `incoming`, one channel per router shard, each packet to the shard that
//! owns its flow ([`ToShards`]), and takes packets for peers on `outgoing`,
//! one channel per encryption lane, which every shard shares: the packets
//! of one peer all go to the same lane ([`lane_of`]), and lanes are
//! encrypted in parallel. All channels are bounded. A router task never
//! awaits room in a lane while it has other work: a packet whose lane is
//! full waits in the router's bounded queue, which drops what does not fit,
//! as a full TUN queue would, so a slow tunnel never stalls the router.
//! Dropping the handle stops the transport.

mod lane_steering;
pub mod rawip;
mod socket_buffers;
mod uapi;
mod udp_gso;
pub mod wireguard;

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::sync::mpsc;

use crate::config::{Config, Key, PeerConfig};
use crate::core::shard::Shards;

/// One plain IP packet, v4 or v6, as it travels between the router and a
/// transport.
pub type IpPacket = BytesMut;

/// A running transport.
pub struct TunnelHandle {
    /// Packets from peers, one channel per router shard (`config.shards`):
    /// decrypted, and (for WireGuard) with an inner source address within
    /// the sending peer's allowed IPs.
    pub incoming: Vec<mpsc::Receiver<IpPacket>>,
    /// A way into each shard's `incoming` that does not keep it open, for
    /// a shard to hand another the datagrams it reassembled for it.
    pub to_shards: Vec<mpsc::WeakSender<IpPacket>>,
    /// Packets for peers, one channel per encryption lane
    /// (`config.shards` of them); put each peer's packets on
    /// [`lane_of`] that peer, and never wait for room where it stalls
    /// other work.
    pub outgoing: Vec<mpsc::Sender<IpPacket>>,
    /// The local address of the tunnel's UDP socket.
    pub local_addr: SocketAddr,
    /// Inspects and reconfigures the transport while it runs.
    pub control: TunnelControl,
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

/// The encryption lane, of `lanes`, for the packets of `peer` (lane 0 for
/// a packet of no peer, which the transport drops).
pub fn lane_of(peer: Option<crate::core::PeerId>, lanes: usize) -> usize {
    peer.map_or(0, |peer| peer.0 as usize % lanes.max(1))
}

/// One bounded channel of packets for peers per encryption lane
/// (`config.shards`): the senders in lane order, and the receivers.
fn lanes(config: &Config) -> (Vec<mpsc::Sender<IpPacket>>, Vec<mpsc::Receiver<IpPacket>>) {
    let capacity = config.transmit_queue_capacity.max(1);
    (0..Shards::new(config.shards).count())
        .map(|_| mpsc::channel(capacity))
        .unzip()
}

/// The transport's end of the shards' `incoming` channels: each packet
/// goes to the shard that owns its flow ([`Shards::of_packet`]).
#[derive(Clone)]
pub(crate) struct ToShards {
    senders: Vec<mpsc::Sender<IpPacket>>,
    shards: Shards,
}

impl ToShards {
    /// One channel of `--transmit-queue-capacity` packets per shard of
    /// `config`, and their receiving ends in shard order.
    fn channels(config: &Config) -> (Self, Vec<mpsc::Receiver<IpPacket>>) {
        let shards = Shards::new(config.shards);
        let capacity = config.transmit_queue_capacity.max(1);
        let (senders, receivers) = (0..shards.count()).map(|_| mpsc::channel(capacity)).unzip();
        (ToShards { senders, shards }, receivers)
    }

    /// Weak senders into each shard's channel, for [`TunnelHandle::to_shards`].
    fn downgrade(&self) -> Vec<mpsc::WeakSender<IpPacket>> {
        self.senders.iter().map(mpsc::Sender::downgrade).collect()
    }

    /// Hands `packet` to its shard, waiting for room in that shard's
    /// channel. Fails once that shard's router is gone.
    async fn send(&self, packet: IpPacket) -> Result<(), RouterGone> {
        let shard = self.shards.of_packet(&packet);
        self.senders[shard]
            .send(packet)
            .await
            .map_err(|_| RouterGone)
    }
}

/// A router shard has stopped: the transport stops reading.
#[derive(Debug)]
struct RouterGone;

/// Inspects and reconfigures a running transport: per-peer counters, and
/// replacing the peer list (SIGHUP). Cheap to clone; it does not keep the
/// transport alive, and once the transport has stopped it reports no peers
/// and refuses changes.
#[derive(Clone)]
pub struct TunnelControl(ControlInner);

#[derive(Clone)]
enum ControlInner {
    WireGuard(wireguard::Control),
    /// Raw IP has no peers to count or change.
    RawIp,
}

impl TunnelControl {
    /// A control with no transport behind it, for tests.
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        TunnelControl(ControlInner::RawIp)
    }

    /// Every WireGuard peer's counters, sorted by public key, and the
    /// device's own; nothing in raw IP mode.
    pub async fn status(&self) -> TunnelStatus {
        match &self.0 {
            ControlInner::WireGuard(control) => control.status().await,
            ControlInner::RawIp => TunnelStatus::default(),
        }
    }

    /// The peers' public keys and allowed IPs as the transport has them now
    /// (including changes made through the configuration socket), sorted by
    /// key; the other fields are left empty. None in raw IP mode.
    pub async fn peer_routes(&self) -> Vec<PeerConfig> {
        match &self.0 {
            ControlInner::WireGuard(control) => control.peer_routes().await,
            ControlInner::RawIp => Vec::new(),
        }
    }

    /// Makes `peers` the transport's peer list, keeping the sessions of
    /// peers that stay (see [`PeerChanges`] for what was done).
    pub async fn set_peers(&self, peers: &[PeerConfig]) -> Result<PeerChanges, TunnelError> {
        match &self.0 {
            ControlInner::WireGuard(control) => control.set_peers(peers).await,
            ControlInner::RawIp => Err(TunnelError::WireGuard(
                "raw IP mode has no peers to change".into(),
            )),
        }
    }
}

/// What the WireGuard transport counts, from gotatun's device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    /// Every peer's counters, sorted by public key.
    pub peers: Vec<PeerStatus>,
    /// Data packets dropped because no session has their receiver index: a
    /// peer still using a session from before a restart, say, or garbage
    /// that looks like data.
    pub dropped_no_session: u64,
}

/// One WireGuard peer's counters, from gotatun's device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's public key.
    pub public_key: Key,
    /// Where the peer is now (it follows the peer as it roams).
    pub endpoint: Option<SocketAddr>,
    /// Bytes received from the peer, WireGuard overhead included.
    pub rx_bytes: u64,
    /// Bytes sent to the peer, WireGuard overhead included.
    pub tx_bytes: u64,
    /// Time since the last completed handshake, if there was one.
    pub since_last_handshake: Option<std::time::Duration>,
    /// Data packets from the peer dropped because their inner source
    /// address is not within its allowed IPs (WireGuard's cryptokey
    /// routing).
    pub dropped_source: u64,
    /// Handshakes completed since the peer was added (counted by polling the
    /// device every second; gotatun keeps no count).
    pub handshakes: u64,
}

/// What [`TunnelControl::set_peers`] did, in numbers of peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Peers new to the list, added.
    pub added: usize,
    /// Peers no longer in the list, removed with their sessions.
    pub removed: usize,
    /// Peers modified in place, sessions kept.
    pub updated: usize,
    /// Peers left exactly as they were.
    pub unchanged: usize,
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
