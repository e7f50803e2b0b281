//! TCP: the peer's connections, terminated here and relayed over host
//! sockets.
//!
//! # Theory of operation
//!
//! **What is translated.** The peer opens a TCP connection to any address.
//! We answer as that address would ("stackless" translation, as passt does):
//! one small state machine per connection speaks TCP to the peer, and the
//! driver carries the byte stream over an ordinary host socket connected to
//! the real destination. No TCP/IP stack, no per-connection task here; the
//! core only says what the socket should do ([`SocketAction`]) and hears
//! back what it did (`Router::handle_tcp_*`).
//!
//! **Goals.** The peer sees the truth (SYN-ACK only once the host connect
//! succeeded; refused means RST; unreachable means ICMP); no byte is lost or
//! reordered either way; memory per connection is bounded by
//! `--tcp-buffer-size` in each direction and is small when idle; one slow
//! connection never holds up another.
//!
//! **States** (in [`conn`]):
//! - *SynSent*: only for reverse forwards (`-t`), where we open the
//!   connection toward the peer once the driver has accepted a host-side
//!   client: our SYN, retransmitted with backoff; the peer's RST or no
//!   SYN-ACK within `--tcp-connect-timeout` aborts the host socket; a
//!   SYN-ACK makes it *Open* (see `conn/active.rs`).
//! - *Connecting*: SYN received, [`SocketAction::TcpConnect`] issued. A
//!   retransmitted SYN does nothing; a RST from the peer closes the socket.
//!   No answer within `--tcp-connect-timeout`: the attempt is dropped
//!   quietly (a later SYN starts a new one).
//! - *SynReceived*: connected; SYN-ACK sent (with our MSS and, if the peer
//!   offered it, window scale), retransmitted on the RTO up to 5 times.
//!   Host data is already read into the send buffer.
//! - *Open*: data both ways. Each direction closes on its own: the peer's
//!   FIN becomes [`SocketAction::TcpShutdownWrite`] once every earlier byte
//!   was reported written; the host's EOF becomes our FIN after every
//!   earlier byte, sent and retransmitted like data. When both are done and
//!   our FIN is acknowledged, the socket is closed ([`SocketAction::TcpClose`]).
//!   A RST from the peer aborts the host socket ([`SocketAction::TcpAbort`],
//!   SO_LINGER 0), except once both FINs are acknowledged: the peer's end
//!   may then already be gone, its kernel resets any segment we still send,
//!   and the bytes we acknowledged are still written before the usual
//!   shutdown and close (as RFC 1337 has TIME-WAIT ignore a RST). No window
//!   update follows the peer's FIN: it would be exactly such a segment.
//! - *TimeWait*: only when we closed first; 2 s without any socket, to
//!   acknowledge a retransmitted FIN. A new SYN on the same addresses
//!   replaces it at once.
//!
//! **Peer to host.** In-order bytes within our window are handed to the
//! driver at once ([`SocketAction::TcpWrite`]), as views of the received
//! packet when the router owns it ([`packet::share`]); the driver reports
//! what the socket took (`handle_tcp_written`). They are acknowledged as a
//! Linux receiver does: at once for every second full segment, a short
//! segment (the end of a write), a FIN, or a segment that fills a hole or
//! repeats bytes; otherwise after [`DELAYED_ACK`], unless data of ours
//! carries the ACK first. Our window is `--tcp-buffer-size` minus the
//! bytes not yet written, so a slow host reader closes the peer's window:
//! bounded memory, and the peer's own congestion control does the rest. An
//! opening is announced at once only while the window the peer knows is
//! less than half open. Up to 64 out-of-order segments within the window
//! are kept (each answered by a duplicate ACK); anything beyond the window
//! is dropped and answered with an ACK.
//!
//! **Host to peer.** The core grants the driver read credit
//! ([`SocketAction::TcpRead`], additive) so that buffered plus granted bytes
//! never exceed `--tcp-buffer-size`; the driver reads within it straight
//! into the connection's send buffer (`Router::handle_tcp_read`, a ring of
//! its own in `ring.rs`). A slow peer leaves the buffer full, the
//! driver stops reading, and the host socket's sender blocks. Segments are
//! cut lazily: a connection with something to send joins a ready list, and
//! [`Tcp::poll_segment`] (behind `Router::poll_transmit`) makes one segment
//! at a time, round-robin, only when the driver has room in the tunnel.
//! Sending is limited by the peer's window and a Reno congestion window
//! (slow start, NewReno fast retransmit after 3 duplicate ACKs, RTO per
//! RFC 6298 with a 200 ms floor and exponential backoff, go-back-N after a
//! timeout). A zero window is probed with one byte on the same timer.
//!
//! **Timers.** Each connection has one deadline (connect timeout, RTO or
//! probe, delayed ACK, idle, TIME-WAIT), kept in one ordered index; an
//! earlier deadline replaces the indexed one, a later one waits until the
//! indexed one fires (then the connection re-arms). Idle: `--tcp-idle-timeout` (default 2 h)
//! while both directions are open, at most 10 min once either has closed;
//! an idle connection is reset both ways. 12 RTO expiries in a row reset it
//! too.
//!
//! **Limits,** per peer: each connection belongs to the peer whose allowed
//! IPs hold its peer-side address, and the limits count each peer's
//! connections on their own, so one peer's flood never refuses or evicts
//! another peer's. At `--max-tcp-connections` (TIME-WAIT entries included)
//! a new SYN gets a RST and a log line (at most one per 10 s); established
//! connections are never evicted. At `--max-tcp-pending-connects` the peer's
//! *oldest* connect still in progress is abandoned instead, as a BSD SYN
//! cache drops its oldest entry: its host socket is closed
//! ([`SocketAction::TcpClose`]), nothing is sent to the peer (its SYN was as
//! good as lost, and its own retransmission starts a new attempt), and the
//! new SYN proceeds. A flood of SYNs to a black hole then costs a legitimate
//! connect nothing but a slot: it is the newest, and only
//! `--max-tcp-pending-connects` newer SYNs could push it out. If the driver
//! cannot make a socket (out of descriptors), it reports a failed connect
//! and the peer gets a RST.
//!
//! **Out of scope.** SACK, timestamps (and so PAWS), TCP Fast Open, urgent
//! data, ECN, path MTU discovery (the MSS comes from `--mtu`).

mod conn;
mod ring;
mod seq;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};

use super::flows::{FlowId, FlowTable};
use super::limit::LimitLog;
use super::packet::{self, TcpSegment, Unreachable};
use super::peers::PeerId;
use super::{SocketAction, Stats};
use crate::Config;
use conn::{Alive, Conn, Ctx};

/// Why a host connect failed, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The destination refused (RST): the peer gets a RST.
    Refused,
    /// No route to the network: the peer gets ICMP net unreachable.
    NetUnreachable,
    /// The host does not answer: the peer gets ICMP host unreachable.
    HostUnreachable,
    /// The connect timed out in the kernel: dropped quietly.
    TimedOut,
    /// No socket could be made (out of descriptors or memory): RST.
    NoResources,
    /// Anything else: RST.
    Other,
}

/// How long the ACK of in-order data may wait for a second segment to
/// share it, or for data of ours to carry it (the delayed ACK of RFC 1122
/// §4.2.3.2, at most 500 ms there; Linux waits 40 ms at least). The
/// segments of a burst arrive back to back (a full one takes 0.11 ms at
/// 100 Mbit/s), so a millisecond pairs them wherever ACKs cost anything.
/// A sender that does wait for the ACK (at the end of a burst, or holding
/// a small write by Nagle's algorithm after a full segment) loses about two
/// round trips of the benchmark's rig (0.4–0.6 ms each), not Linux's 40 ms.
/// A shorter delay would gain nothing: the driver's timer counts whole
/// milliseconds.
pub(crate) const DELAYED_ACK: Duration = Duration::from_millis(1);

/// The TCP settings, derived from [`Config`].
pub(super) struct Settings {
    /// Per-connection buffer bound, each direction.
    pub buffer: usize,
    /// Our window scale shift: the smallest that fits `buffer` in 16 bits.
    pub wscale: u8,
    /// MSS for IPv4 and IPv6 peers: MTU minus 40 and 60.
    mss_v4: u32,
    mss_v6: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    max_pending: usize,
}

impl Settings {
    fn new(config: &Config) -> Self {
        let buffer = config.tcp_buffer_size.clamp(1, 1 << 30);
        let wscale = (0..14u8).find(|s| buffer >> s <= 65535).unwrap_or(14);
        let mtu = u32::from(config.mtu);
        Settings {
            buffer,
            wscale,
            mss_v4: mtu.saturating_sub(40).max(64),
            mss_v6: mtu.saturating_sub(60).max(64),
            connect_timeout: config.tcp_connect_timeout,
            idle_timeout: config.tcp_idle_timeout,
            max_pending: config.max_tcp_pending_connects.max(1),
        }
    }

    /// Our MSS toward `peer`.
    pub fn mss_for(&self, peer: SocketAddr) -> u32 {
        if peer.is_ipv6() {
            self.mss_v6
        } else {
            self.mss_v4
        }
    }
}

/// Every TCP connection, keyed by (peer endpoint, remote endpoint).
pub struct Tcp {
    flows: FlowTable<(SocketAddr, SocketAddr), Conn>,
    settings: Settings,
    /// (deadline, flow), one entry per connection.
    timers: BTreeSet<(Instant, FlowId)>,
    /// Connections with something to send, round-robin.
    ready: VecDeque<FlowId>,
    /// Packets made while handling an input, for the router's queue.
    packets: VecDeque<BytesMut>,
    /// Each peer's connections waiting for their host connect, oldest
    /// (smallest id: ids grow with time) first; a peer with none has no
    /// entry.
    pending: HashMap<PeerId, BTreeSet<FlowId>>,
    pending_connects: usize,
    secret: [u8; 16],
    epoch: Option<Instant>,
    limit_log: LimitLog,
    evict_log: LimitLog,
}

impl Tcp {
    /// An empty table for `config`, with `secret` keying the initial
    /// sequence numbers.
    pub fn new(config: &Config, secret: [u8; 16]) -> Self {
        Tcp {
            // The table's own idle index is unused: TCP keeps per-connection deadlines.
            flows: FlowTable::new(config.max_tcp_connections, Duration::MAX),
            settings: Settings::new(config),
            timers: BTreeSet::new(),
            ready: VecDeque::new(),
            packets: VecDeque::new(),
            pending: HashMap::new(),
            pending_connects: 0,
            secret,
            epoch: None,
            limit_log: LimitLog::default(),
            evict_log: LimitLog::default(),
        }
    }

    /// The number of connections, TIME-WAIT included.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The number of connections waiting for their host connect.
    pub fn pending_connects(&self) -> usize {
        self.pending_connects
    }

    /// The number of connections of `owner`, TIME-WAIT included.
    pub fn owned(&self, owner: PeerId) -> usize {
        self.flows.owned(owner)
    }

    /// The number of connections of `owner` waiting for their host connect.
    pub fn pending_of(&self, owner: PeerId) -> usize {
        self.pending.get(&owner).map_or(0, BTreeSet::len)
    }

    /// The peer that owns connection `flow`.
    pub fn owner(&self, flow: FlowId) -> Option<PeerId> {
        self.flows.owner(flow)
    }

    /// Closes every connection of `owner` on the host side (a connect in
    /// progress is closed, anything else aborted, so the host side sees a
    /// RST); nothing goes to the peer. Returns how many.
    pub fn close_owner(&mut self, owner: PeerId, actions: &mut VecDeque<SocketAction>) -> usize {
        let flows = self.flows.flows_of(owner);
        for &flow in &flows {
            let connecting = self
                .flows
                .get(flow)
                .is_some_and(|(_, conn)| conn.is_connecting());
            self.remove(flow);
            actions.push_back(if connecting {
                SocketAction::TcpClose { flow }
            } else {
                SocketAction::TcpAbort { flow }
            });
        }
        flows.len()
    }

    fn pending_add(&mut self, owner: PeerId, flow: FlowId) {
        if self.pending.entry(owner).or_default().insert(flow) {
            self.pending_connects += 1;
        }
    }

    fn pending_remove(&mut self, owner: PeerId, flow: FlowId) {
        let Some(set) = self.pending.get_mut(&owner) else {
            return;
        };
        if set.remove(&flow) {
            self.pending_connects -= 1;
        }
        if set.is_empty() {
            self.pending.remove(&owner);
        }
    }

    /// The next packet made while handling an input.
    pub fn pop_packet(&mut self) -> Option<BytesMut> {
        self.packets.pop_front()
    }

    /// Whether [`Tcp::poll_segment`] may have something.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The earliest connection deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// A segment from the peer endpoint `peer`, of peer `owner`, to
    /// `remote`.
    ///
    /// `connect_to` is where a new connection to `remote` would connect on
    /// the host side, or `None` if the access policy denies `remote` (the
    /// SYN then gets a RST).
    #[allow(clippy::too_many_arguments)]
    pub fn segment(
        &mut self,
        now: Instant,
        owner: PeerId,
        peer: SocketAddr,
        remote: SocketAddr,
        connect_to: Option<SocketAddr>,
        seg: &TcpSegment<'_>,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.epoch.get_or_insert(now);
        if let Some(flow) = self.flows.lookup(&(peer, remote)) {
            let replace = seg.syn
                && seg.ack.is_none()
                && self.flows.get(flow).is_some_and(|(_, c)| c.is_time_wait());
            if !replace {
                self.with_conn(flow, actions, stats, |conn, ctx| {
                    conn.on_segment(now, seg, ctx)
                });
                return;
            }
            self.remove(flow);
        }
        if seg.rst {
            return;
        }
        if !seg.syn || seg.ack.is_some() {
            stats.tcp_stray_segments += 1;
            self.reset_stray(peer, remote, seg, stats);
            return;
        }
        let Some(connect_to) = connect_to else {
            self.reset_stray(peer, remote, seg, stats);
            return;
        };
        self.open(now, owner, peer, remote, connect_to, seg, actions, stats);
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        now: Instant,
        owner: PeerId,
        peer: SocketAddr,
        remote: SocketAddr,
        connect_to: SocketAddr,
        syn: &TcpSegment<'_>,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        if peer.is_ipv6() != remote.is_ipv6() || remote.port() == 0 {
            stats.tcp_segments_dropped += 1;
            return;
        }
        if self.pending_of(owner) >= self.settings.max_pending {
            self.evict_oldest_pending(now, owner, actions, stats);
        }
        if self.flows.is_full(owner) {
            stats.tcp_refused_limit += 1;
            self.log_limit(now, "--max-tcp-connections");
            self.reset_stray(peer, remote, syn, stats);
            return;
        }
        let clock = now.saturating_duration_since(self.epoch.unwrap_or(now));
        let iss = seq::isn(&self.secret, clock, remote, peer);
        let our_mss = self.settings.mss_for(peer);
        let conn = Conn::new(now, syn, iss, peer.is_ipv6(), our_mss, &self.settings);
        let Ok(flow) = self.flows.try_insert(owner, (peer, remote), conn, now) else {
            return;
        };
        self.pending_add(owner, flow);
        stats.tcp_connects += 1;
        tracing::debug!(flow = flow.0, %peer, %remote, "new TCP connection: connecting");
        actions.push_back(SocketAction::TcpConnect {
            flow,
            dest: connect_to,
        });
        self.reindex(flow);
    }

    /// Abandons the oldest connect of `owner` still in progress, to make
    /// room for a new one (see "Limits" above).
    fn evict_oldest_pending(
        &mut self,
        now: Instant,
        owner: PeerId,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        let Some(&flow) = self.pending.get(&owner).and_then(BTreeSet::first) else {
            return;
        };
        tracing::debug!(
            flow = flow.0,
            peer = owner.0,
            "oldest TCP connect abandoned: --max-tcp-pending-connects reached"
        );
        self.remove(flow);
        actions.push_back(SocketAction::TcpClose { flow });
        stats.tcp_pending_evicted += 1;
        if let Some(evicted) = self.evict_log.hit(now) {
            tracing::warn!(
                evicted,
                "--max-tcp-pending-connects reached by a peer: its oldest connects abandoned"
            );
        }
    }

    fn log_limit(&mut self, now: Instant, flag: &str) {
        if let Some(refused) = self.limit_log.hit(now) {
            tracing::warn!(
                refused,
                "new TCP connections refused with RST: {flag} reached"
            );
        }
    }

    /// Answers a segment that belongs to no connection (RFC 793, "reset
    /// generation"): nothing for a RST; a RST from its ACK number if it has
    /// one; otherwise a RST+ACK covering it.
    fn reset_stray(
        &mut self,
        peer: SocketAddr,
        remote: SocketAddr,
        seg: &TcpSegment<'_>,
        stats: &mut Stats,
    ) {
        if seg.rst {
            return;
        }
        let reply = match seg.ack {
            Some(ack) => TcpSegment {
                seq: ack,
                rst: true,
                ..TcpSegment::default()
            },
            None => TcpSegment {
                seq: 0,
                ack: Some(seg.seq.wrapping_add(seg.seq_len())),
                rst: true,
                ..TcpSegment::default()
            },
        };
        if let Some(packet) = packet::build_tcp(remote, peer, &reply) {
            tracing::trace!(%peer, %remote, "RST for a segment of no connection");
            stats.tcp_resets_sent += 1;
            self.packets.push_back(packet);
        }
    }

    /// Whether a connection has the addresses (`peer`, `remote`).
    pub fn in_use(&self, peer: SocketAddr, remote: SocketAddr) -> bool {
        self.flows.lookup(&(peer, remote)).is_some()
    }

    /// Opens a connection to `peer` (of peer `owner`) from `remote` for a host socket that a
    /// reverse forward accepted (see [`conn`]'s active open): the SYN goes
    /// out with the next [`Tcp::poll_segment`]. `None` at
    /// `--max-tcp-connections`, or if the addresses are taken or of
    /// different IP versions: the caller aborts the socket.
    pub fn active_open(
        &mut self,
        now: Instant,
        owner: PeerId,
        peer: SocketAddr,
        remote: SocketAddr,
        stats: &mut Stats,
    ) -> Option<FlowId> {
        self.epoch.get_or_insert(now);
        if peer.is_ipv6() != remote.is_ipv6() || self.in_use(peer, remote) {
            stats.tcp_forward_dropped += 1;
            return None;
        }
        if self.flows.is_full(owner) {
            stats.tcp_refused_limit += 1;
            self.log_limit(now, "--max-tcp-connections");
            return None;
        }
        let clock = now.saturating_duration_since(self.epoch.unwrap_or(now));
        let iss = seq::isn(&self.secret, clock, remote, peer);
        let our_mss = self.settings.mss_for(peer);
        let conn = Conn::new_active(now, iss, our_mss, &self.settings);
        let flow = self
            .flows
            .try_insert(owner, (peer, remote), conn, now)
            .ok()?;
        if let Some((_, conn)) = self.flows.get_mut(flow) {
            conn.queued = true;
            self.ready.push_back(flow);
        }
        stats.tcp_forward_accepted += 1;
        tracing::debug!(flow = flow.0, %peer, source = %remote, "reverse TCP connection: SYN to the peer");
        self.reindex(flow);
        Some(flow)
    }

    /// The host connect of `flow` succeeded.
    pub fn connected(
        &mut self,
        now: Instant,
        flow: FlowId,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.with_conn(flow, actions, stats, |conn, ctx| {
            conn.on_connected(now, ctx);
            Alive::Yes
        });
    }

    /// The host connect of `flow` failed; the driver has dropped the socket.
    pub fn connect_failed(&mut self, flow: FlowId, error: ConnectError, stats: &mut Stats) {
        let Some((&(peer, remote), conn)) = self.flows.get(flow) else {
            return;
        };
        if !conn.is_connecting() {
            return;
        }
        let irs = conn.irs();
        tracing::debug!(flow = flow.0, %remote, ?error, "TCP connect failed");
        stats.tcp_connect_failures += 1;
        let reply = match error {
            ConnectError::TimedOut => None,
            ConnectError::NetUnreachable => {
                packet::build_dst_unreachable_tcp(peer, remote, irs, Unreachable::Net)
            }
            ConnectError::HostUnreachable => {
                packet::build_dst_unreachable_tcp(peer, remote, irs, Unreachable::Host)
            }
            ConnectError::Refused | ConnectError::NoResources | ConnectError::Other => {
                stats.tcp_resets_sent += 1;
                let rst = TcpSegment {
                    seq: 0,
                    ack: Some(irs.wrapping_add(1)),
                    rst: true,
                    ..TcpSegment::default()
                };
                packet::build_tcp(remote, peer, &rst)
            }
        };
        self.packets.extend(reply);
        self.remove(flow);
    }

    /// Bytes read from the host socket of `flow`.
    pub fn data(
        &mut self,
        now: Instant,
        flow: FlowId,
        data: &[u8],
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.with_conn(flow, actions, stats, |conn, ctx| {
            conn.on_data(now, data, ctx);
            Alive::Yes
        });
    }

    /// Reads from the host socket of `flow` into its send buffer (see
    /// `Router::handle_tcp_read`).
    pub fn read<R>(
        &mut self,
        now: Instant,
        flow: FlowId,
        max: usize,
        read: impl FnOnce(&mut dyn BufMut) -> R,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) -> Option<R> {
        let mut outcome = None;
        self.with_conn(flow, actions, stats, |conn, ctx| {
            outcome = conn.on_read(now, max, read, ctx);
            Alive::Yes
        });
        outcome
    }

    /// The host socket of `flow` reached end of stream.
    pub fn eof(
        &mut self,
        now: Instant,
        flow: FlowId,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.with_conn(flow, actions, stats, |conn, ctx| conn.on_eof(now, ctx));
    }

    /// The driver wrote `n` more bytes to the host socket of `flow`.
    pub fn written(
        &mut self,
        now: Instant,
        flow: FlowId,
        n: usize,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.with_conn(flow, actions, stats, |conn, ctx| {
            conn.on_written(now, n, ctx)
        });
    }

    /// The host socket of `flow` failed or was reset; the driver dropped it.
    pub fn host_error(
        &mut self,
        flow: FlowId,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.with_conn(flow, actions, stats, |conn, ctx| conn.on_host_error(ctx));
    }

    /// Runs every connection deadline up to `now`.
    pub fn expire(
        &mut self,
        now: Instant,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        while let Some(&(at, flow)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, flow));
            if let Some((_, conn)) = self.flows.get_mut(flow) {
                conn.indexed = None;
            }
            self.with_conn(flow, actions, stats, |conn, ctx| conn.on_timer(now, ctx));
        }
    }

    /// The next segment of the next connection in the ready list.
    pub fn poll_segment(
        &mut self,
        now: Instant,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) -> Option<BytesMut> {
        while let Some(flow) = self.ready.pop_front() {
            let Some((&(peer, remote), conn)) = self.flows.get_mut(flow) else {
                continue;
            };
            conn.queued = false;
            let mut ctx = Ctx {
                flow,
                peer,
                remote,
                settings: &self.settings,
                actions,
                packets: &mut self.packets,
                ready: &mut self.ready,
                stats,
            };
            let packet = conn.poll_segment(now, &mut ctx);
            if conn.wants_to_send() {
                conn.queued = true;
                self.ready.push_back(flow);
            }
            self.reindex(flow);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Resets every connection toward both sides (shutdown); see
    /// [`conn`]'s `shut_down`. Afterwards the table is empty.
    pub fn shut_down(&mut self, actions: &mut VecDeque<SocketAction>, stats: &mut Stats) {
        let mut flows = Vec::with_capacity(self.flows.len());
        self.flows
            .drain(|flow, key, conn| flows.push((flow, key, conn)));
        for (flow, (peer, remote), mut conn) in flows {
            tracing::debug!(flow = flow.0, %peer, %remote, "TCP connection reset: shutting down");
            let mut ctx = Ctx {
                flow,
                peer,
                remote,
                settings: &self.settings,
                actions,
                packets: &mut self.packets,
                ready: &mut self.ready,
                stats,
            };
            let _ = conn.shut_down(&mut ctx);
        }
        self.timers.clear();
        self.ready.clear();
        self.pending_connects = 0;
    }

    /// Runs `f` on connection `flow`, then removes it if it ended, and
    /// updates its deadline otherwise.
    fn with_conn(
        &mut self,
        flow: FlowId,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
        f: impl FnOnce(&mut Conn, &mut Ctx<'_>) -> Alive,
    ) {
        let Some((&(peer, remote), conn)) = self.flows.get_mut(flow) else {
            return;
        };
        let was_connecting = conn.is_connecting();
        let mut ctx = Ctx {
            flow,
            peer,
            remote,
            settings: &self.settings,
            actions,
            packets: &mut self.packets,
            ready: &mut self.ready,
            stats,
        };
        match f(conn, &mut ctx) {
            Alive::Yes => {
                if was_connecting
                    && !conn.is_connecting()
                    && let Some(owner) = self.flows.owner(flow)
                {
                    self.pending_remove(owner, flow);
                }
                self.reindex(flow);
            }
            // `remove` counts a connection that ends while connecting.
            Alive::No => self.remove(flow),
        }
    }

    /// Puts `flow`'s deadline in the index if it is earlier than the one
    /// there.
    fn reindex(&mut self, flow: FlowId) {
        let Some((_, conn)) = self.flows.get_mut(flow) else {
            return;
        };
        let deadline = conn.deadline(&self.settings);
        if conn.indexed.is_some_and(|at| at <= deadline) {
            return;
        }
        if let Some(old) = conn.indexed.replace(deadline) {
            self.timers.remove(&(old, flow));
        }
        self.timers.insert((deadline, flow));
    }

    /// Forgets `flow` (its socket has been dealt with).
    fn remove(&mut self, flow: FlowId) {
        let owner = self.flows.owner(flow);
        if let Some((_, conn)) = self.flows.remove(flow) {
            if let Some(owner) = owner
                && conn.is_connecting()
            {
                self.pending_remove(owner, flow);
            }
            if let Some(at) = conn.indexed {
                self.timers.remove(&(at, flow));
            }
        }
    }
}
