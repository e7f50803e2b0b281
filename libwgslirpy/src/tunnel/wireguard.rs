//! WireGuard transport: gotatun's device layer without a TUN device.
//!
//! # Theory of operation
//!
//! gotatun's [`Device`] normally sits between a UDP socket and a TUN device.
//! Here the TUN side is replaced by the router's two channels:
//! [`ToRouter`] implements [`IpSend`] (the device hands us decrypted packets)
//! and [`FromRouter`] implements [`IpRecv`] (the device takes the packets to
//! encrypt). The UDP side is gotatun's own socket type, bound by
//! [`ExactBind`] to the configured address rather than to the device's
//! default dual-stack `::`.
//!
//! What the device does for us, per peer:
//! - **Handshakes in both roles.** It answers initiations from peers it knows
//!   and initiates when it has packets for a peer without a session. Because
//!   a freshly started device only initiates when it has something to send,
//!   [`start`] asks it to initiate at once for every peer with an endpoint.
//! - **Timers:** handshake retransmission, rekeying after 2 minutes or 2^60
//!   messages, session expiry, passive and persistent keepalives, checked
//!   every 250 ms.
//! - **Cookies under load:** above 100 handshake messages a second it stops
//!   doing Diffie-Hellman for unverified sources and answers with cookie
//!   replies instead (WireGuard's DoS mitigation).
//! - **Roaming:** a peer's endpoint follows the source address of the newest
//!   authenticated packet from it.
//! - **Allowed IPs, both ways:** an outgoing packet goes to the peer whose
//!   allowed IPs hold its destination (or nowhere); an incoming packet is
//!   dropped unless its inner source lies within the sending peer's allowed
//!   IPs.
//!
//! Costs: per batch, a device read lock (the patched device has no
//! buffering tasks of its own, `vendor/gotatun/PATCHED.md`); per packet, a
//! per-peer tokio mutex and one hop over our channel. On the way in the
//! packet stays in gotatun's pooled buffer, with no copy; on the way out it
//! is sealed in its own buffer, which the router builds with room for
//! WireGuard's header, padding and tag ([`TRANSPORT_TAILROOM`]). The device logs through `tracing`
//! itself (peer added, task errors; a warning per packet with a disallowed
//! inner source in debug builds).
//!
//! [`TRANSPORT_TAILROOM`]: crate::core::packet::TRANSPORT_TAILROOM

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gotatun::device::{self, Device, Peer};
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use gotatun::udp::socket::{SockOpt, UdpSocket};
use gotatun::udp::{UdpRecv, UdpTransportFactory, UdpTransportFactoryParams};
use gotatun::x25519;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::udp_gso::GsoSocket;
use super::{IpPacket, TunnelError, TunnelHandle};
use crate::config::{Config, Key, PeerConfig};

/// Most packets handed to the device in one [`IpRecv::recv`] call.
const MAX_BATCH: usize = 64;

/// How long a handshake we initiate may take before we log that it has not
/// completed. gotatun keeps retransmitting on its own (WireGuard gives up on
/// an attempt after 90 s, and starts a new one when there is traffic).
const HANDSHAKE_LOG_AFTER: Duration = Duration::from_secs(90);

/// The device with our transports: exact-address UDP, and the router's
/// channels in place of a TUN device.
type WgDevice = Device<(ExactBind, ToRouter, FromRouter)>;

/// Keeps the WireGuard transport alive.
///
/// Dropping it aborts the handshake tasks and drops the [`Device`], whose
/// `Drop` spawns its shutdown: the UDP socket closes shortly afterwards, not
/// synchronously.
pub(super) struct Running {
    /// Tasks that initiate handshakes (at startup, and for peers added by a
    /// reload); aborted on drop. Declared before `device` so their clones
    /// of it go first.
    _handshakes: Handshakes,
    /// The device itself.
    _device: Arc<WgDevice>,
    /// The configuration socket, if one was asked for.
    _uapi: Option<super::uapi::UapiSocket>,
}

impl Running {
    /// Stops the device and waits until it has stopped.
    pub(super) async fn stop(self) {
        // Taken out first: no lock guard may live across the await, or the
        // future could not move between threads.
        let handshakes = self
            ._handshakes
            .lock()
            .map(|mut set| std::mem::take(&mut *set))
            .ok();
        if let Some(mut handshakes) = handshakes {
            handshakes.shutdown().await;
        }
        if let Some(device) = Arc::into_inner(self._device) {
            device.stop().await;
        }
    }
}

/// Starts the WireGuard transport: builds a gotatun device with `key` and
/// `peers`, bound to `config.bind`, and starts handshakes with every peer
/// that has an endpoint.
pub(super) async fn start(
    config: &Config,
    key: &Key,
    peers: &[PeerConfig],
) -> Result<TunnelHandle, TunnelError> {
    if peers.is_empty() {
        // Without peers the device would not even bind its socket.
        return Err(TunnelError::WireGuard("no peers configured".into()));
    }

    let (to_shards, incoming) = super::ToShards::channels(config);
    let weak_shards = to_shards.downgrade();
    let (outgoing, mut lanes) = super::lanes(config);
    let first_lane = lanes.remove(0);

    let device_peers = peers.iter().map(device_peer);

    let (uapi_server, uapi_socket) = match &config.uapi_socket {
        Some(path) => {
            let (server, socket) =
                super::uapi::serve(path).map_err(|source| TunnelError::Uapi {
                    path: path.clone(),
                    source,
                })?;
            (Some(server), Some(socket))
        }
        None => (None, None),
    };

    let builder = device::build()
        .with_udp(ExactBind {
            ip: config.bind.ip(),
            buffer: config.tunnel_socket_buffer,
            lanes: outgoing.len(),
            binds: 0,
        })
        .with_ip_pair(
            ToRouter(to_shards),
            FromRouter {
                packets: first_lane,
                lanes,
                batch: Vec::with_capacity(MAX_BATCH),
                mtu: config.mtu,
            },
        )
        .with_private_key(x25519::StaticSecret::from(key.0))
        .with_listen_port(config.bind.port())
        .with_peers(device_peers);
    let builder = match uapi_server {
        Some(server) => builder.with_uapi(server),
        None => builder,
    };
    let device = builder.build().await.map_err(|error| match error {
        device::Error::Bind(source, _) => TunnelError::Bind {
            addr: config.bind,
            source,
        },
        other => TunnelError::WireGuard(other.to_string()),
    })?;
    let device = Arc::new(device);

    // The device records the port it bound (useful when asked for port 0).
    let port = device.read(async |device| device.listen_port()).await;
    let local_addr = SocketAddr::new(config.bind.ip(), port);
    tracing::debug!(%local_addr, peers = peers.len(), "WireGuard device up");

    let handshakes = Handshakes::default();
    for peer in peers {
        if let Some(endpoint) = peer.endpoint {
            spawn_handshake(&handshakes, &device, peer.public_key, endpoint);
        }
    }
    let handshake_counts = HandshakeCounts::default();
    if let Ok(mut set) = handshakes.lock() {
        set.spawn(count_handshakes(
            Arc::downgrade(&device),
            Arc::clone(&handshake_counts),
        ));
    }
    let control = Control {
        device: Arc::downgrade(&device),
        applied: Arc::new(tokio::sync::Mutex::new(peers.to_vec())),
        handshakes: Arc::clone(&handshakes),
        handshake_counts,
    };

    Ok(TunnelHandle {
        incoming,
        to_shards: weak_shards,
        outgoing,
        local_addr,
        control: super::TunnelControl(super::ControlInner::WireGuard(control)),
        _running: super::Running::WireGuard(Running {
            _handshakes: handshakes,
            _device: device,
            _uapi: uapi_socket,
        }),
    })
}

/// The handshake tasks, shared by the running transport (which aborts them
/// when it stops) and its [`Control`] (which adds one per new peer).
type Handshakes = Arc<std::sync::Mutex<JoinSet<()>>>;

/// Starts [`initiate_handshake`] in `handshakes`.
fn spawn_handshake(
    handshakes: &Handshakes,
    device: &Arc<WgDevice>,
    public_key: Key,
    endpoint: SocketAddr,
) {
    if let Ok(mut set) = handshakes.lock() {
        // Reap the finished ones, so that the set stays as small as the
        // handshakes in progress.
        while set.try_join_next().is_some() {}
        set.spawn(initiate_handshake(Arc::clone(device), public_key, endpoint));
    }
}

/// How often [`count_handshakes`] looks at the device's peers. WireGuard
/// completes at most one handshake per peer in this time (a rekey comes
/// every two minutes), so none is missed.
const HANDSHAKE_CHECK: Duration = Duration::from_secs(1);

/// Per peer: handshakes completed, and the time since the last one as last
/// seen.
type HandshakeCounts = Arc<std::sync::Mutex<HashMap<[u8; 32], (u64, Option<Duration>)>>>;

/// Counts completed handshakes, which gotatun 0.10.2 does not: a peer's
/// "time since the last handshake" that appears, or that is shorter than
/// when last seen, is a new handshake.
async fn count_handshakes(device: std::sync::Weak<WgDevice>, counts: HandshakeCounts) {
    let mut check = tokio::time::interval(HANDSHAKE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        let Some(device) = device.upgrade() else {
            return;
        };
        let peers = device.peers().await;
        drop(device);
        let Ok(mut counts) = counts.lock() else {
            return;
        };
        counts.retain(|key, _| peers.iter().any(|p| p.peer.public_key.as_bytes() == key));
        for peer in &peers {
            let entry = counts
                .entry(peer.peer.public_key.to_bytes())
                .or_insert((0, None));
            let since = peer.stats.last_handshake;
            let new = match (entry.1, since) {
                (None, Some(_)) => true,
                (Some(before), Some(now)) => now < before,
                (_, None) => false,
            };
            if new {
                entry.0 += 1;
            }
            entry.1 = since;
        }
    }
}

/// Inspects and reconfigures the running device for [`super::TunnelControl`].
///
/// Holds the device weakly: a control handle kept by a metrics server or a
/// signal handler never keeps a stopped device alive.
#[derive(Clone)]
pub(super) struct Control {
    device: std::sync::Weak<WgDevice>,
    /// The peers as last configured (at startup or by the last reload): a
    /// peer's configured endpoint is compared with this, not with the
    /// device's, which follows the peer as it roams.
    applied: Arc<tokio::sync::Mutex<Vec<PeerConfig>>>,
    handshakes: Handshakes,
    handshake_counts: HandshakeCounts,
}

impl Control {
    /// Every peer's counters, and the device's own.
    pub(super) async fn status(&self) -> super::TunnelStatus {
        let Some(device) = self.device.upgrade() else {
            return super::TunnelStatus::default();
        };
        let counts = self
            .handshake_counts
            .lock()
            .map(|counts| counts.clone())
            .unwrap_or_default();
        // One read of the device for both, so that they are of one moment.
        let (stats, dropped_no_session) = device
            .read(async |device| (device.peers().await, device.rx_dropped_no_session()))
            .await;
        let mut peers: Vec<super::PeerStatus> = stats
            .into_iter()
            .map(|stats| super::PeerStatus {
                public_key: Key(stats.peer.public_key.to_bytes()),
                endpoint: stats.peer.endpoint,
                rx_bytes: stats.stats.rx_bytes as u64,
                tx_bytes: stats.stats.tx_bytes as u64,
                since_last_handshake: stats.stats.last_handshake,
                dropped_source: stats.stats.rx_dropped_source as u64,
                handshakes: counts
                    .get(&stats.peer.public_key.to_bytes())
                    .map_or(0, |&(count, _)| count),
            })
            .collect();
        peers.sort_by_key(|peer| peer.public_key.0);
        super::TunnelStatus {
            peers,
            dropped_no_session: dropped_no_session as u64,
        }
    }

    /// The device's peers as the router needs them: public key and allowed
    /// IPs (normalized), sorted by key. Changes made with `wg set` show here.
    pub(super) async fn peer_routes(&self) -> Vec<PeerConfig> {
        let Some(device) = self.device.upgrade() else {
            return Vec::new();
        };
        let mut peers: Vec<PeerConfig> = device
            .peers()
            .await
            .into_iter()
            .map(|stats| {
                PeerConfig::new(
                    Key(stats.peer.public_key.to_bytes()),
                    normalized(&stats.peer.allowed_ips),
                )
            })
            .collect();
        peers.sort_by_key(|peer| peer.public_key.0);
        peers
    }

    /// Makes the device's peers `peers`, as `wg syncconf` would, without
    /// touching the sessions of peers that stay: peers that are gone are
    /// removed; new ones are added (and, with an endpoint, handshaken with
    /// at once); a peer whose allowed IPs, preshared key or keepalive
    /// differ from the device's, or whose configured endpoint differs from
    /// the one configured before, is modified in place. gotatun's UAPI
    /// `set` would instead replace a modified peer, dropping its session.
    pub(super) async fn set_peers(
        &self,
        peers: &[PeerConfig],
    ) -> Result<super::PeerChanges, TunnelError> {
        let device = self
            .device
            .upgrade()
            .ok_or_else(|| TunnelError::WireGuard("the device has stopped".into()))?;
        let mut applied = self.applied.lock().await;
        let current = device.peers().await;
        let mut changes = super::PeerChanges::default();
        let mut handshakes = Vec::new();
        device
            .write(async |device| {
                for stats in &current {
                    let key = stats.peer.public_key.to_bytes();
                    if !peers.iter().any(|peer| peer.public_key.0 == key) {
                        device.remove_peer(&stats.peer.public_key).await;
                        tracing::info!(peer = %Key(key).to_base64(), "peer removed");
                        changes.removed += 1;
                    }
                }
                for peer in peers {
                    let public_key = x25519::PublicKey::from(peer.public_key.0);
                    let name = peer.public_key.to_base64();
                    let Some(stats) = current.iter().find(|s| s.peer.public_key == public_key)
                    else {
                        device.add_peer(device_peer(peer));
                        tracing::info!(peer = %name, "peer added");
                        if let Some(endpoint) = peer.endpoint {
                            handshakes.push((peer.public_key, endpoint));
                        }
                        changes.added += 1;
                        continue;
                    };
                    let before = applied.iter().find(|p| p.public_key == peer.public_key);
                    let allowed_ips = normalized(&peer.allowed_ips);
                    let allowed_changed = normalized(&stats.peer.allowed_ips) != allowed_ips;
                    let psk = peer.preshared_key.map(|k| k.0);
                    let psk_changed = stats.peer.preshared_key != psk;
                    let keepalive = peer.keepalive.filter(|&s| s != 0);
                    let keepalive_changed = stats.peer.keepalive != keepalive;
                    // Only a configured endpoint that changed is set: the
                    // device's own follows the peer as it roams, and a
                    // removed Endpoint keeps the current one.
                    let endpoint = peer
                        .endpoint
                        .filter(|&e| before.map_or(stats.peer.endpoint, |b| b.endpoint) != Some(e));
                    if !(allowed_changed || psk_changed || keepalive_changed || endpoint.is_some())
                    {
                        changes.unchanged += 1;
                        continue;
                    }
                    device
                        .modify_peer(&public_key, |modify| {
                            if allowed_changed {
                                modify.clear_allowed_ips();
                                modify.add_allowed_ips(allowed_ips.iter().copied());
                            }
                            if psk_changed {
                                modify.set_preshared_key(psk);
                            }
                            if keepalive_changed {
                                modify.set_keepalive(keepalive);
                            }
                            if endpoint.is_some() {
                                modify.set_endpoint(endpoint);
                            }
                        })
                        .await;
                    tracing::info!(
                        peer = %name,
                        allowed_ips = allowed_changed,
                        preshared_key = psk_changed,
                        keepalive = keepalive_changed,
                        endpoint = endpoint.is_some(),
                        "peer updated; its session is kept"
                    );
                    changes.updated += 1;
                }
            })
            .await
            .map_err(|error| TunnelError::WireGuard(error.to_string()))?;
        for (public_key, endpoint) in handshakes {
            spawn_handshake(&self.handshakes, &device, public_key, endpoint);
        }
        *applied = peers.to_vec();
        Ok(changes)
    }
}

/// Allowed IPs as the device stores them: host bits cleared, sorted, no
/// duplicates.
fn normalized(networks: &[ipnetwork::IpNetwork]) -> Vec<ipnetwork::IpNetwork> {
    let mut out: Vec<ipnetwork::IpNetwork> = networks
        .iter()
        .filter_map(|net| ipnetwork::IpNetwork::new(net.network(), net.prefix()).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The device's form of a configured peer.
fn device_peer(peer: &PeerConfig) -> Peer {
    if peer.allowed_ips.is_empty() {
        tracing::warn!(
            peer = %peer.public_key.to_base64(),
            "peer has no allowed IPs: no packet will be accepted from it or routed to it"
        );
    }
    let mut device_peer = Peer::new(x25519::PublicKey::from(peer.public_key.0))
        .with_allowed_ips(peer.allowed_ips.iter().copied());
    if let Some(psk) = peer.preshared_key {
        device_peer = device_peer.with_preshared_key(psk.0);
    }
    device_peer.endpoint = peer.endpoint;
    device_peer.keepalive = peer.keepalive.filter(|&seconds| seconds != 0);
    device_peer
}

/// Asks the device to initiate a handshake with `public_key` now, and logs
/// how it went. Without this, a restarted device would stay silent until the
/// router had a packet for the peer, while the peer may still hold a session
/// with our previous incarnation.
async fn initiate_handshake(device: Arc<WgDevice>, public_key: Key, endpoint: SocketAddr) {
    let peer = public_key.to_base64();
    let key = x25519::PublicKey::from(public_key.0);
    tracing::debug!(%peer, %endpoint, "initiating handshake");
    match tokio::time::timeout(HANDSHAKE_LOG_AFTER, device.force_handshake(&key)).await {
        Ok(Ok(())) => tracing::debug!(%peer, "handshake completed"),
        Ok(Err(error)) => tracing::debug!(%peer, %error, "could not initiate handshake"),
        Err(_) => {
            // A session may exist anyway, if the peer initiated it.
            let has_session =
                device.peers().await.iter().any(|stats| {
                    stats.peer.public_key == key && stats.stats.last_handshake.is_some()
                });
            if has_session {
                tracing::debug!(%peer, "session established by the peer's handshake");
            } else {
                tracing::debug!(
                    %peer,
                    %endpoint,
                    "no answer to our handshake yet; will retry when there is traffic"
                );
            }
        }
    }
}

/// The device's way to the routers: decrypted, source-checked packets go
/// into the bounded `incoming` channel of the shard that owns their flow.
struct ToRouter(super::ToShards);

impl IpSend for ToRouter {
    /// Every receive lane hands its packets to the same shards.
    fn lane(&self) -> Option<Self> {
        Some(ToRouter(self.0.clone()))
    }

    /// Hands the packet over in gotatun's pooled buffer itself, without a
    /// copy, and waits for room in its shard's channel. The pool takes the
    /// buffer back for reuse once the router has dropped it (the router and
    /// driver copy what they keep for longer: out-of-order segments, and
    /// bytes a host socket did not take); until then the pool allocates
    /// another.
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        let bytes = std::mem::take(packet.into_bytes().buf_mut());
        tracing::trace!(len = bytes.len(), "packet from peer");
        self.0
            .send(bytes)
            .await
            // BrokenPipe tells gotatun to stop reading: the router is gone.
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "router stopped"))
    }
}

/// The router's way to the device: packets for peers, taken from the
/// bounded `outgoing` channel.
struct FromRouter {
    /// The router's outgoing packets, of one lane.
    packets: mpsc::Receiver<IpPacket>,
    /// The other lanes, until the device takes them
    /// ([`IpRecv::take_lanes`]).
    lanes: Vec<mpsc::Receiver<IpPacket>>,
    /// Reused buffer for one batch.
    batch: Vec<IpPacket>,
    /// The tunnel MTU, reported to the device.
    mtu: u16,
}

impl IpRecv for FromRouter {
    /// Waits for one packet, then takes whatever else is queued, up to
    /// [`MAX_BATCH`]. Packets too short to be IP are dropped here.
    async fn recv<'a>(
        &'a mut self,
        _pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.batch.clear();
        if self.packets.recv_many(&mut self.batch, MAX_BATCH).await == 0 {
            // UnexpectedEof tells gotatun to stop reading: the router is gone.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "router stopped",
            ));
        }
        Ok(self.batch.drain(..).filter_map(into_ip_packet))
    }

    fn mtu(&self) -> MtuWatcher {
        MtuWatcher::new(self.mtu)
    }

    /// The other lanes, each for a send task of the device's own.
    fn take_lanes(&mut self) -> Vec<Self> {
        std::mem::take(&mut self.lanes)
            .into_iter()
            .map(|packets| FromRouter {
                packets,
                lanes: Vec::new(),
                batch: Vec::with_capacity(MAX_BATCH),
                mtu: self.mtu,
            })
            .collect()
    }
}

/// Wraps a router packet for gotatun, or drops it if it is too short to be
/// IP. The device drops packets whose version is neither 4 nor 6.
fn into_ip_packet(bytes: IpPacket) -> Option<Packet<Ip>> {
    let len = bytes.len();
    match Packet::from_bytes(bytes).try_into_ip() {
        Ok(packet) => Some(packet),
        Err(error) => {
            tracing::trace!(len, %error, "dropping outgoing packet");
            None
        }
    }
}

/// Binds the device's UDP sockets to one exact IP address, with the port the
/// device asks for, and sizes their buffers. gotatun's own factory would
/// bind dual-stack `::`.
///
/// With several lanes, the device binds one socket per receive lane, all on
/// one port with `SO_REUSEPORT`, and the steering program sends each peer's
/// datagrams to the socket of its lane ([`super::lane_steering`]), so one
/// peer's packets are decrypted in order and different peers' in parallel
/// (the kernel's hash of the endpoints, if the program cannot be attached,
/// keeps the order but not the spread). `SO_REUSEPORT` would also let us join the
/// group of another process of the same user unnoticed (a second gateway
/// started on the same port by mistake), so the first socket of each set
/// is preceded by a probe without it, which fails if anything has the port;
/// and a later gateway's probe fails on ours.
struct ExactBind {
    /// The address to bind, from `config.bind`.
    ip: IpAddr,
    /// Kernel buffer to ask for each way, from `config.tunnel_socket_buffer`.
    buffer: usize,
    /// Receive lanes: sockets per port.
    lanes: usize,
    /// Sockets bound since the last failure: the device binds them `lanes`
    /// at a time, so a multiple of `lanes` starts a set.
    binds: usize,
}

impl ExactBind {
    /// Fails if `port` (0: any) of our address is in use, as a bind without
    /// `SO_REUSEPORT` sees it; returns the port, chosen by the kernel if 0.
    fn probe(&self, port: u16, options: SockOpt) -> io::Result<u16> {
        let probe = UdpSocket::bind(SocketAddr::new(self.ip, port), options)?;
        Ok(probe.local_addr()?.port())
    }
}

impl UdpTransportFactory for ExactBind {
    type Send = GsoSocket;
    type Recv = GsoSocket;

    fn lanes(&self) -> usize {
        self.lanes
    }

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> io::Result<(Self::Send, Self::Recv)> {
        let only_v6 = match self.ip {
            // `::` means every address, IPv4 included, as it does for `-b`.
            IpAddr::V6(ip) if ip.is_unspecified() => Some(false),
            IpAddr::V6(_) => Some(true),
            IpAddr::V4(_) => None,
        };
        let mut options = SockOpt {
            #[cfg(target_os = "linux")]
            fwmark: params.fwmark,
            only_v6,
            ..SockOpt::default()
        };
        let mut port = params.port;
        if self.lanes > 1 {
            if self.binds.is_multiple_of(self.lanes) {
                port = self.probe(port, options).inspect_err(|_| self.binds = 0)?;
            }
            options.reuse_port = true;
        }
        // A failed bind fails the device's whole set, whose sockets are then
        // dropped: the next set starts over, with a probe.
        let socket = UdpSocket::bind(SocketAddr::new(self.ip, port), options)
            .inspect_err(|_| self.binds = 0)?;
        self.binds += 1;
        if self.lanes > 1 {
            // Each peer's datagrams to its own lane, not the endpoints' hash.
            if let Err(error) = super::lane_steering::steer_by_receiver_index(&socket, self.lanes) {
                tracing::info!(%error, "receive lanes chosen by the kernel's hash of the endpoints");
            }
        }
        super::socket_buffers::request(&socket, self.buffer);
        if let Err(error) = socket.enable_udp_gro() {
            tracing::debug!(%error, "UDP GRO unavailable");
        }
        let socket = GsoSocket::new(socket);
        Ok((socket.clone(), socket))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::Transport;
    use crate::core::shard::Shards;

    /// A fresh random key pair: (private, public).
    fn key_pair() -> (Key, Key) {
        let private = Key(rand::random());
        let public = x25519::PublicKey::from(&x25519::StaticSecret::from(private.0));
        (private, Key(public.to_bytes()))
    }

    fn config(private: Key, peer: PeerConfig, bind: SocketAddr) -> Config {
        Config::new(
            Transport::WireGuard {
                private_key: private,
                peers: vec![peer],
            },
            bind,
        )
    }

    fn peer(public_key: Key, endpoint: Option<SocketAddr>, allowed: &str) -> PeerConfig {
        PeerConfig {
            endpoint,
            ..PeerConfig::new(public_key, vec![allowed.parse().unwrap()])
        }
    }

    /// An IPv4/UDP packet from `src` to `dst` carrying `payload`.
    fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> bytes::BytesMut {
        let (src, dst) = (SocketAddr::from((src, 1234)), SocketAddr::from((dst, 5678)));
        crate::core::packet::build_udp(src, dst, payload).expect("small IPv4 packet")
    }

    #[tokio::test]
    async fn binds_exact_address_and_reports_port() {
        let (private, _) = key_pair();
        let (_, other) = key_pair();
        let cfg = config(
            private,
            peer(other, None, "10.0.0.2/32"),
            "127.0.0.1:0".parse().unwrap(),
        );
        let handle = super::super::start(&cfg).await.unwrap();
        assert_eq!(handle.local_addr.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        assert_ne!(handle.local_addr.port(), 0);
        // The port really is taken, by us.
        assert!(std::net::UdpSocket::bind(handle.local_addr).is_err());
    }

    #[tokio::test]
    async fn port_in_use_is_a_bind_error() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let (private, _) = key_pair();
        let (_, other) = key_pair();
        let cfg = config(private, peer(other, None, "10.0.0.2/32"), addr);
        let result = tokio::time::timeout(Duration::from_secs(5), super::super::start(&cfg))
            .await
            .expect("start must not hang");
        match result {
            Err(TunnelError::Bind {
                addr: reported,
                source,
            }) => {
                assert_eq!(reported, addr);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            Err(other) => panic!("expected a bind error, got {other}"),
            Ok(_) => panic!("expected a bind error, but the port was bound twice"),
        }
    }

    /// A socket that holds the port with `SO_REUSEPORT` does not make the
    /// lanes join it: the probe before them fails.
    #[tokio::test]
    async fn lanes_do_not_join_a_port_held_with_reuseport() {
        let holder = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        holder.set_reuse_port(true).unwrap();
        holder
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = holder.local_addr().unwrap().as_socket().unwrap();
        let (private, _) = key_pair();
        let (_, other) = key_pair();
        let mut cfg = config(private, peer(other, None, "10.0.0.2/32"), addr);
        cfg.shards = 2;
        assert!(matches!(
            super::super::start(&cfg).await,
            Err(TunnelError::Bind { .. })
        ));
    }

    #[tokio::test]
    async fn no_peers_is_refused() {
        let (private, _) = key_pair();
        let cfg = Config::new(
            Transport::WireGuard {
                private_key: private,
                peers: vec![],
            },
            "127.0.0.1:0".parse().unwrap(),
        );
        assert!(matches!(
            super::super::start(&cfg).await,
            Err(TunnelError::WireGuard(_))
        ));
    }

    /// Two transports on loopback: the client initiates, a packet goes
    /// through each way, and a packet with a source outside the client's
    /// allowed IPs is dropped by the server.
    #[tokio::test]
    async fn handshake_and_packets_both_ways() {
        let (server_private, server_public) = key_pair();
        let (client_private, client_public) = key_pair();
        let client_ip = Ipv4Addr::new(10, 0, 0, 2);
        let outside = Ipv4Addr::new(192, 0, 2, 1);

        // The server knows the client's key but not where it is.
        let mut server = super::super::start(&config(
            server_private,
            peer(client_public, None, "10.0.0.2/32"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        // The client routes everything to the server and initiates.
        let mut client = super::super::start(&config(
            client_private,
            peer(server_public, Some(server.local_addr), "0.0.0.0/0"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();

        let wait = Duration::from_secs(10);

        // A spoofed inner source first: it must not arrive.
        let spoofed = ipv4_udp(Ipv4Addr::new(10, 0, 0, 3), outside, b"spoofed");
        client.outgoing[0].try_send(spoofed).unwrap();
        let request = ipv4_udp(client_ip, outside, b"request");
        client.outgoing[0].try_send(request.clone()).unwrap();
        let got = tokio::time::timeout(wait, server.incoming[0].recv())
            .await
            .expect("packet through the tunnel")
            .unwrap();
        assert_eq!(got, request);

        // The server learned the client's endpoint from the handshake.
        let reply = ipv4_udp(outside, client_ip, b"reply");
        server.outgoing[0].try_send(reply.clone()).unwrap();
        let got = tokio::time::timeout(wait, client.incoming[0].recv())
            .await
            .expect("reply through the tunnel")
            .unwrap();
        assert_eq!(got, reply);
    }

    /// With two lanes the server binds two sockets on one port: packets of
    /// two peers reach it (on the shard that owns each), and packets to
    /// them leave through either lane.
    #[tokio::test]
    async fn two_lanes_share_one_port_and_serve_two_peers_both_ways() {
        let outside = Ipv4Addr::new(192, 0, 2, 1);
        let (server_config, server_public, clients) = two_lane_server(2);
        let mut server = super::super::start(&server_config).await.unwrap();
        assert_eq!((server.incoming.len(), server.outgoing.len()), (2, 2));
        let port = format!(":{:04X}", server.local_addr.port());
        let sockets = std::fs::read_to_string("/proc/net/udp")
            .unwrap()
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| local.ends_with(&port))
            })
            .count();
        assert_eq!(sockets, 2, "one socket per receive lane");

        // A second gateway on the port is refused, lanes or not.
        let mut second = server_config.clone();
        second.bind = server.local_addr;
        assert!(matches!(
            super::super::start(&second).await,
            Err(TunnelError::Bind { .. })
        ));

        let shards = Shards::new(2);
        let wait = Duration::from_secs(10);
        for (lane, (private, _, ip)) in clients.iter().enumerate() {
            let mut client = super::super::start(&config(
                *private,
                peer(server_public, Some(server.local_addr), "0.0.0.0/0"),
                "127.0.0.1:0".parse().unwrap(),
            ))
            .await
            .unwrap();
            let request = ipv4_udp(*ip, outside, b"request");
            client.outgoing[0].try_send(request.clone()).unwrap();
            let shard = shards.of_packet(&request);
            let got = tokio::time::timeout(wait, server.incoming[shard].recv())
                .await
                .expect("packet through the tunnel")
                .unwrap();
            assert_eq!(got, request);
            let reply = ipv4_udp(outside, *ip, b"reply");
            server.outgoing[lane].try_send(reply.clone()).unwrap();
            let got = tokio::time::timeout(wait, client.incoming[0].recv())
                .await
                .expect("reply through the tunnel")
                .unwrap();
            assert_eq!(got, reply);
        }
    }

    /// `count` clients (private key, public key, inner address from
    /// 10.0.0.2 on), and the config of a server on loopback with two lanes
    /// that has them all as peers, in that order; and the server's public key.
    fn two_lane_server(count: u8) -> (Config, Key, Vec<(Key, Key, Ipv4Addr)>) {
        let (server_private, server_public) = key_pair();
        let clients: Vec<(Key, Key, Ipv4Addr)> = (2..2 + count)
            .map(|n| {
                let (private, public) = key_pair();
                (private, public, Ipv4Addr::new(10, 0, 0, n))
            })
            .collect();
        let peers = clients
            .iter()
            .map(|(_, public, ip)| peer(*public, None, &format!("{ip}/32")))
            .collect();
        let mut server_config = Config::new(
            Transport::WireGuard {
                private_key: server_private,
                peers,
            },
            "127.0.0.1:0".parse().unwrap(),
        );
        server_config.shards = 2;
        (server_config, server_public, clients)
    }

    /// Relays datagrams between one client and `server`, from a port of its
    /// own (the client's endpoint for the server), and records the lane
    /// named by each data message the client sends (`lane_steering`).
    async fn tap(
        server: SocketAddr,
        lanes: usize,
    ) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<usize>>>) {
        use std::sync::{Arc, Mutex};
        let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let named = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&named);
        tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let to = if from == server {
                    match client {
                        Some(client) => client,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    if n > 4 && buf[0] == 4 {
                        // The receiver index's low byte, first on the wire.
                        seen.lock().unwrap().push(usize::from(buf[4]) % lanes);
                    }
                    server
                };
                let _ = socket.send_to(&buf[..n], to).await;
            }
        });
        (addr, named)
    }

    /// With two lanes, peers take them in turn: each peer's session indices
    /// are in its lane (gotatun patch 6), so the steering program sends its
    /// data to its lane's socket whatever its endpoint. (Random indices
    /// would give this order one time in 16.)
    #[tokio::test]
    async fn peers_name_indices_of_the_lanes_they_took_in_turn() {
        let (server_config, server_public, clients) = two_lane_server(4);
        let mut server = super::super::start(&server_config).await.unwrap();
        let shards = Shards::new(2);
        let mut lanes_named = Vec::new();
        for (private, _, ip) in &clients {
            let (relay, named) = tap(server.local_addr, 2).await;
            let client = super::super::start(&config(
                *private,
                peer(server_public, Some(relay), "0.0.0.0/0"),
                "127.0.0.1:0".parse().unwrap(),
            ))
            .await
            .unwrap();
            for n in 0..5u8 {
                let request = ipv4_udp(*ip, Ipv4Addr::new(192, 0, 2, 1), &[n; 10]);
                client.outgoing[0].try_send(request.clone()).unwrap();
                let got = tokio::time::timeout(
                    Duration::from_secs(10),
                    server.incoming[shards.of_packet(&request)].recv(),
                )
                .await
                .expect("packet through the tunnel")
                .unwrap();
                assert_eq!(got, request);
            }
            let named = named.lock().unwrap().clone();
            assert!(named.len() >= 5, "data messages seen: {named:?}");
            assert!(named.iter().all(|&lane| lane == named[0]), "{named:?}");
            lanes_named.push(named[0]);
        }
        assert_eq!(lanes_named, [0, 1, 0, 1], "lanes in turn");
    }

    /// With an endpoint configured, we handshake at once, before the router
    /// has anything to send (otherwise a restarted gateway stays silent).
    #[tokio::test]
    async fn initiates_without_traffic() {
        let (server_private, server_public) = key_pair();
        let (client_private, client_public) = key_pair();
        let server = super::super::start(&config(
            server_private,
            peer(client_public, None, "10.0.0.2/32"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        let client = super::super::start(&config(
            client_private,
            peer(server_public, Some(server.local_addr), "0.0.0.0/0"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        let super::super::Running::WireGuard(running) = &server._running else {
            unreachable!("WireGuard transport");
        };
        let handshaken = async {
            loop {
                let peers = running._device.peers().await;
                if peers.iter().any(|p| p.stats.last_handshake.is_some()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), handshaken)
            .await
            .expect("the client initiated a handshake by itself");
        drop(client);
    }

    /// Dropping the handle releases the UDP port soon after.
    #[tokio::test]
    async fn drop_releases_the_port() {
        let (private, _) = key_pair();
        let (_, other) = key_pair();
        let cfg = config(
            private,
            peer(other, None, "10.0.0.2/32"),
            "127.0.0.1:0".parse().unwrap(),
        );
        let handle = super::super::start(&cfg).await.unwrap();
        let addr = handle.local_addr;
        drop(handle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if std::net::UdpSocket::bind(addr).is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "port still bound after drop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A flood of handshake initiations from one address (from a key the
    /// device does not know) makes the device answer with cookie replies
    /// instead of doing Diffie-Hellman, and a real peer still gets through.
    #[tokio::test]
    async fn handshake_flood_gets_cookie_replies_and_real_peer_survives() {
        use gotatun::noise::Tunn;
        use gotatun::noise::index_table::IndexTable;
        use gotatun::noise::rate_limiter::RateLimiter;

        /// WireGuard's message type of a cookie reply.
        const COOKIE_REPLY: u8 = 3;

        let (server_private, server_public) = key_pair();
        let (client_private, client_public) = key_pair();
        let mut server = super::super::start(&config(
            server_private,
            peer(client_public, None, "10.0.0.2/32"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();

        // The attacker knows the server's public key (so MAC1 is valid)
        // but is not a configured peer.
        let (attacker_private, attacker_public) = key_pair();
        let mut attacker = Tunn::new(
            x25519::StaticSecret::from(attacker_private.0),
            x25519::PublicKey::from(server_public.0),
            None,
            None,
            IndexTable::from_os_rng(),
            Arc::new(RateLimiter::new(
                &x25519::PublicKey::from(attacker_public.0),
                100,
            )),
        );
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..400 {
            let init = attacker.format_handshake_initiation(true).unwrap();
            let bytes: Packet = init.into();
            socket.send_to(&bytes, server.local_addr).await.unwrap();
        }
        let mut cookie_replies = 0;
        let mut buf = [0u8; 256];
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
        {
            assert!(len > 0);
            if buf[0] == COOKIE_REPLY {
                cookie_replies += 1;
            }
        }
        assert!(
            cookie_replies > 0,
            "no cookie reply to 400 handshakes from one source"
        );

        // The real peer, from another source port but the same address,
        // still completes a handshake once the rate limit window passes.
        let client = super::super::start(&config(
            client_private,
            peer(server_public, Some(server.local_addr), "0.0.0.0/0"),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        let packet = ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(192, 0, 2, 1),
            b"hi",
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let _ = client.outgoing[0].try_send(packet.clone());
            if let Ok(Some(got)) =
                tokio::time::timeout(Duration::from_millis(500), server.incoming[0].recv()).await
            {
                assert_eq!(got, packet);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "real peer locked out"
            );
        }
    }

    /// A packet as the router builds it is sealed in its own buffer (no
    /// allocation in the encryptor, `vendor/gotatun/PATCHED.md`), and the
    /// peer opens it intact.
    #[test]
    fn router_packets_are_sealed_in_their_own_buffer() {
        use gotatun::noise::index_table::IndexTable;
        use gotatun::noise::rate_limiter::RateLimiter;
        use gotatun::noise::{Tunn, TunnResult};
        use gotatun::packet::WgKind;

        let end = |own: u8, other: u8| {
            let secret = x25519::StaticSecret::from([own; 32]);
            let public = x25519::PublicKey::from(&secret);
            let other = x25519::PublicKey::from(&x25519::StaticSecret::from([other; 32]));
            let limiter = Arc::new(RateLimiter::new(&public, 100));
            Tunn::new(
                secret,
                other,
                None,
                None,
                IndexTable::from_os_rng(),
                limiter,
            )
        };
        let (mut gateway, mut peer) = (end(1, 2), end(2, 1));
        let init = peer.format_handshake_initiation(false).unwrap();
        let TunnResult::WriteToNetwork(response) =
            gateway.handle_incoming_packet(WgKind::HandshakeInit(init))
        else {
            panic!("no handshake response");
        };
        let TunnResult::WriteToNetwork(keepalive) = peer.handle_incoming_packet(response) else {
            panic!("no keepalive");
        };
        assert!(matches!(
            gateway.handle_incoming_packet(keepalive),
            TunnResult::WriteToTunnel(_)
        ));

        let mut mtu = MtuWatcher::new(1420);
        // Full size, and a size that WireGuard pads.
        for payload in [1392, 1001] {
            let ip = crate::core::packet::build_udp(
                "198.18.2.2:53".parse().unwrap(),
                "10.0.2.15:4000".parse().unwrap(),
                &vec![0x5a; payload],
            )
            .unwrap();
            let (original, start) = (ip.clone(), ip.as_ptr());
            let packet = into_ip_packet(ip).unwrap();
            let sealed = gateway
                .handle_outgoing_packet(packet.into(), Some(&mut mtu))
                .unwrap();
            let sealed = Packet::from(sealed);
            assert_eq!(sealed.as_ptr(), start, "sealed in another buffer");
            let TunnResult::WriteToTunnel(opened) =
                peer.handle_incoming_packet(sealed.try_into_wg().unwrap())
            else {
                panic!("the peer could not open it");
            };
            assert_eq!(&opened[..original.len()], &original[..]);
        }
    }
}
