//! One connection toward the peer: the state machine that the parent
//! module's theory of operation describes.
//!
//! Every method takes a [`Ctx`] naming the flow, its two addresses and the
//! queues that outputs go to, and returns (where a connection can end)
//! whether the connection is still alive. A connection that returns
//! [`Alive::No`] has already pushed whatever socket action its end needs.

mod active;
mod output;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::ring::ByteRing;
use super::seq::{Rto, dist, le, lt};
use super::{DELAYED_ACK, Settings};
use crate::core::packet::{self, TcpSegment};
use crate::core::{FlowId, SocketAction, Stats};

/// RTO expiries in a row before the connection is given up (about 6 min
/// with the 60 s cap).
const MAX_RETRIES: u8 = 12;
/// SYN-ACK transmissions before a connection that the peer never completes
/// is given up (1 + 2 + 4 + 8 + 16 s).
const MAX_SYNACK_RETRIES: u8 = 5;
/// How long a connection that we closed first stays to re-acknowledge a
/// retransmitted FIN. No socket is held meanwhile.
pub(super) const TIME_WAIT: Duration = Duration::from_secs(2);
/// Idle limit once either direction has closed.
const HALF_CLOSED_IDLE: Duration = Duration::from_secs(600);
/// Out-of-order segments kept at most: enough for a whole 64 KiB window
/// of full segments. Their bytes lie within the window, so memory stays
/// bounded by `--tcp-buffer-size` whatever their number.
const MAX_OOO_SEGMENTS: usize = 64;
/// Duplicate ACKs that trigger a fast retransmit (RFC 5681).
const DUPACK_THRESHOLD: u8 = 3;
/// Most pure ACKs owed at once: one per out-of-order segment kept.
const MAX_ACKS_OWED: u8 = MAX_OOO_SEGMENTS as u8;
/// The MSS that every TCP accepts (RFC 9293 §3.7.1): any peer's full
/// segments are at least this long, so a shorter segment ends a write.
const DEFAULT_MSS: u32 = 536;

/// Whether a connection lives on after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alive {
    Yes,
    No,
}

/// What a connection needs from its surroundings for one call.
pub(super) struct Ctx<'a> {
    pub flow: FlowId,
    /// The peer's endpoint (inside the tunnel).
    pub peer: SocketAddr,
    /// The endpoint the peer connected to, which we stand in for.
    pub remote: SocketAddr,
    pub settings: &'a Settings,
    pub actions: &'a mut VecDeque<SocketAction>,
    pub packets: &'a mut VecDeque<BytesMut>,
    pub ready: &'a mut VecDeque<FlowId>,
    pub stats: &'a mut Stats,
}

impl Ctx<'_> {
    fn send(&mut self, segment: &TcpSegment<'_>) {
        if let Some(packet) = packet::build_tcp(self.remote, self.peer, segment) {
            self.packets.push_back(packet);
        }
    }

    fn action(&mut self, action: SocketAction) {
        self.actions.push_back(action);
    }
}

/// The connection's phase. Each direction's close is tracked apart, in
/// [`Inbound`] and `host_eof`/`fin_acked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN received; the host connect is pending. Only a retransmitted SYN
    /// (ignored) or a RST (ends it) mean anything.
    Connecting { since: Instant },
    /// Active open (a reverse forward): our SYN sent or due, waiting for
    /// the peer's SYN-ACK. No host data is read yet.
    SynSent { since: Instant },
    /// Host connected; SYN-ACK sent or due, waiting for the peer's ACK.
    /// Host data may already be buffered, none is sent.
    SynReceived,
    /// Synchronised: data flows both ways until each side closes.
    Open,
    /// Both directions closed, we closed first: no socket is left; a
    /// retransmitted FIN is acknowledged again until the time is up.
    TimeWait { until: Instant },
}

/// The peer-to-host direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    Open,
    /// The peer's FIN is in; bytes before it are still being written.
    FinReceived,
    /// Every byte written, then `shutdown(Write)` asked for.
    Shut,
}

/// One connection. See the module docs.
pub(super) struct Conn {
    state: State,
    last_activity: Instant,

    // Peer to host.
    irs: u32,
    rcv_nxt: u32,
    /// Bytes handed to the driver and not yet reported written.
    unwritten: usize,
    /// Segments beyond a hole: (sequence number, bytes).
    ooo: Vec<(u32, Bytes)>,
    /// Where an out-of-order FIN sits.
    ooo_fin: Option<u32>,
    inbound: Inbound,
    /// Right edge of the window last advertised.
    adv_edge: u32,
    /// The acknowledgment number we last sent: what the peer knows we
    /// have (Linux's `rcv_wup`).
    rcv_acked: u32,
    /// The largest segment the peer has sent, at most the MSS we
    /// advertised: how long a full one is (Linux's `rcv_mss`).
    rcv_mss: u32,
    /// An ACK is due at once.
    ack_due: bool,
    /// When the delayed ACK of in-order data is due, if one is pending
    /// (see [`Conn::ack_in_order`]).
    delayed_ack_at: Option<Instant>,
    /// Pure ACKs owed: one per segment that needs its own answer (out of
    /// order, duplicate, out of window, a probe), so that the peer counts
    /// duplicate ACKs as from an eager answer. See [`Conn::owe_ack`].
    acks_owed: u8,
    /// The peer offered window scaling, so both sides use it.
    wscale_ok: bool,
    our_wscale: u8,

    // Host to peer.
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    snd_max: u32,
    snd_wnd: u32,
    snd_wl1: u32,
    snd_wl2: u32,
    peer_wscale: u8,
    mss: u32,
    /// Bytes from the host, from `snd_una` on: unacknowledged, then unsent.
    send_buf: ByteRing,
    /// Bytes the driver may still read for us.
    credit: usize,
    host_eof: bool,
    fin_acked: bool,
    /// Our FIN went out before the peer's arrived: we close first.
    closed_first: bool,
    /// The peer reset after both FINs were acknowledged, so its end is
    /// gone: we only finish writing to the host and say nothing more to
    /// the peer.
    peer_done: bool,
    syn_ack_due: bool,
    /// Our SYN is due (active open only).
    syn_due: bool,
    /// A zero-window probe is due.
    probe: bool,

    // Loss recovery.
    rto: Rto,
    rto_at: Option<Instant>,
    retries: u8,
    rtt_probe: Option<(u32, Instant)>,
    dupacks: u8,
    recover: Option<u32>,
    retransmit_one: bool,
    cwnd: u32,
    ssthresh: u32,

    /// In the ready list.
    pub(super) queued: bool,
    /// The deadline this connection has in the timer index.
    pub(super) indexed: Option<Instant>,
}

impl Conn {
    /// A connection for the peer's SYN `syn`, with our initial sequence
    /// number `iss`. The caller asks the driver to connect.
    ///
    /// `our_mss` is what the tunnel MTU carries for this IP version; the
    /// peer's MSS option (or the RFC default without one) is capped by it.
    pub(super) fn new(
        now: Instant,
        syn: &TcpSegment<'_>,
        iss: u32,
        ipv6: bool,
        our_mss: u32,
        settings: &Settings,
    ) -> Self {
        let (peer_wscale, our_wscale) = match syn.wscale {
            Some(ws) => (ws.min(14), settings.wscale),
            None => (0, 0),
        };
        let default_mss = if ipv6 { 1220 } else { 536 };
        let mss = u32::from(syn.mss.unwrap_or(default_mss))
            .min(our_mss)
            .max(64);
        let rcv_nxt = syn.seq.wrapping_add(1);
        Conn {
            irs: syn.seq,
            rcv_nxt,
            adv_edge: rcv_nxt,
            rcv_acked: rcv_nxt,
            wscale_ok: syn.wscale.is_some(),
            snd_wnd: u32::from(syn.window),
            snd_wl1: syn.seq,
            peer_wscale,
            ..Conn::opening(State::Connecting { since: now }, now, iss, mss, our_wscale)
        }
    }

    /// A connection in `state` that has sent and received nothing yet: what
    /// opening toward the peer and opening for the peer's SYN share.
    fn opening(state: State, now: Instant, iss: u32, mss: u32, our_wscale: u8) -> Self {
        Conn {
            state,
            last_activity: now,
            irs: 0,
            rcv_nxt: 0,
            unwritten: 0,
            ooo: Vec::new(),
            ooo_fin: None,
            inbound: Inbound::Open,
            adv_edge: 0,
            rcv_acked: 0,
            rcv_mss: 0,
            ack_due: false,
            delayed_ack_at: None,
            acks_owed: 0,
            wscale_ok: false,
            our_wscale,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: 0,
            snd_wl1: 0,
            snd_wl2: iss,
            peer_wscale: 0,
            mss,
            send_buf: ByteRing::default(),
            credit: 0,
            host_eof: false,
            fin_acked: false,
            closed_first: false,
            peer_done: false,
            syn_ack_due: false,
            syn_due: false,
            probe: false,
            rto: Rto::new(),
            rto_at: None,
            retries: 0,
            rtt_probe: None,
            dupacks: 0,
            recover: None,
            retransmit_one: false,
            cwnd: 10 * mss,
            ssthresh: u32::MAX,
            queued: false,
            indexed: None,
        }
    }

    pub(super) fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting { .. })
    }

    pub(super) fn is_time_wait(&self) -> bool {
        matches!(self.state, State::TimeWait { .. })
    }

    /// The peer's initial sequence number.
    pub(super) fn irs(&self) -> u32 {
        self.irs
    }

    /// When [`Conn::on_timer`] should next run.
    pub(super) fn deadline(&self, settings: &Settings) -> Instant {
        let idle = match self.state {
            State::Connecting { since } => return since + settings.connect_timeout,
            State::SynSent { since } => {
                let give_up = since + settings.connect_timeout;
                return self.rto_at.map_or(give_up, |at| at.min(give_up));
            }
            State::TimeWait { until } => return until,
            State::Open if self.inbound != Inbound::Open || self.host_eof => {
                settings.idle_timeout.min(HALF_CLOSED_IDLE)
            }
            _ => settings.idle_timeout,
        };
        let idle_at = self.last_activity + idle;
        [self.rto_at, self.delayed_ack_at]
            .into_iter()
            .flatten()
            .fold(idle_at, Instant::min)
    }

    fn wake(&mut self, ctx: &mut Ctx<'_>) {
        if !self.queued {
            self.queued = true;
            ctx.ready.push_back(ctx.flow);
        }
    }

    // ---- host socket events ------------------------------------------------

    /// The host connect succeeded: answer the peer's SYN and let the driver
    /// start reading.
    pub(super) fn on_connected(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        if !self.is_connecting() {
            return;
        }
        self.state = State::SynReceived;
        self.last_activity = now;
        self.syn_ack_due = true;
        self.snd_nxt = self.iss;
        self.wake(ctx);
        self.grant_credit(ctx);
    }

    /// Bytes read from the host socket.
    pub(super) fn on_data(&mut self, now: Instant, data: &[u8], ctx: &mut Ctx<'_>) {
        if !self.reads_host() {
            return;
        }
        // Bounded by the credit granted, which the driver keeps to.
        self.send_buf.extend_from_slice(data, usize::MAX);
        self.took_host_bytes(now, data.len(), ctx);
    }

    /// Reads from the host socket into the send buffer, within the credit
    /// and `max` bytes: `read` fills room in the buffer. `None` (without
    /// calling `read`) if no bytes are taken now.
    pub(super) fn on_read<R>(
        &mut self,
        now: Instant,
        max: usize,
        read: impl FnOnce(&mut dyn BufMut) -> R,
        ctx: &mut Ctx<'_>,
    ) -> Option<R> {
        if !self.reads_host() {
            return None;
        }
        // The buffer grows toward its size, or beyond by a credit granted
        // before the size was lowered.
        let limit = ctx.settings.buffer.max(self.send_buf.len() + self.credit);
        let (n, outcome) = self.send_buf.fill(max.min(self.credit), limit, read)?;
        if n > 0 {
            self.took_host_bytes(now, n, ctx);
        }
        Some(outcome)
    }

    /// Whether bytes from the host are taken: not before the connection is
    /// open toward both sides, nor after the host's end of stream.
    fn reads_host(&self) -> bool {
        !self.host_eof
            && !matches!(
                self.state,
                State::Connecting { .. } | State::SynSent { .. } | State::TimeWait { .. }
            )
    }

    /// `n` bytes from the host were added to the send buffer.
    fn took_host_bytes(&mut self, now: Instant, n: usize, ctx: &mut Ctx<'_>) {
        self.last_activity = now;
        self.credit = self.credit.saturating_sub(n);
        if self.state == State::Open {
            self.arm_persist(now);
            self.wake(ctx);
        }
    }

    /// The host socket reached end of stream: a FIN follows the buffered bytes.
    pub(super) fn on_eof(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Alive {
        if self.host_eof || !matches!(self.state, State::SynReceived | State::Open) {
            return Alive::Yes;
        }
        self.last_activity = now;
        self.host_eof = true;
        self.credit = 0;
        if self.state == State::Open {
            self.wake(ctx);
        }
        Alive::Yes
    }

    /// The driver wrote `n` more bytes to the host socket.
    pub(super) fn on_written(&mut self, now: Instant, n: usize, ctx: &mut Ctx<'_>) -> Alive {
        if self.unwritten == 0 {
            return Alive::Yes;
        }
        self.last_activity = now;
        self.unwritten = self.unwritten.saturating_sub(n);
        if self.inbound == Inbound::FinReceived && self.unwritten == 0 {
            self.inbound = Inbound::Shut;
            ctx.action(SocketAction::TcpShutdownWrite { flow: ctx.flow });
            return self.maybe_finish(now, ctx);
        }
        if self.inbound != Inbound::Open {
            // The peer sends nothing more, so a window update would only be
            // a stray segment; if the peer's end is already gone (it got our
            // ACK of its FIN), its kernel answers it with a RST.
            return Alive::Yes;
        }
        // Tell the peer about the space, once it is worth a segment (RFC 1122
        // receiver-side silly window avoidance), and at once only while the
        // window it knows is less than half open: beyond that it is not held
        // up, and the next ACK (delayed or not) carries the new edge. Were
        // every opening sent at once, each segment written would draw its
        // own ACK and defeat the delayed ACK.
        let edge = self
            .rcv_nxt
            .wrapping_add(self.advertised_window(ctx.settings));
        let threshold = (ctx.settings.buffer as u32 / 2).min(self.mss);
        let known = if lt(self.rcv_nxt, self.adv_edge) {
            dist(self.rcv_nxt, self.adv_edge)
        } else {
            0
        };
        if lt(self.adv_edge, edge)
            && dist(self.adv_edge, edge) >= threshold
            && known < ctx.settings.buffer as u32 / 2
        {
            self.ack_due = true;
            self.wake(ctx);
        }
        Alive::Yes
    }

    /// The host socket failed or was reset; the driver has dropped it.
    pub(super) fn on_host_error(&mut self, ctx: &mut Ctx<'_>) -> Alive {
        if !self.peer_done
            && !matches!(
                self.state,
                State::Connecting { .. } | State::TimeWait { .. }
            )
        {
            self.send_rst(ctx);
        }
        Alive::No
    }

    /// The gateway is shutting down: reset both sides now. The peer gets a
    /// RST (a RST+ACK of its SYN while connecting; nothing once its end is
    /// gone or in TIME-WAIT), and the host socket is aborted (`SO_LINGER`
    /// 0) so the host side sees a RST rather than a FIN that would pass for
    /// a complete stream.
    pub(super) fn shut_down(&mut self, ctx: &mut Ctx<'_>) -> Alive {
        match self.state {
            State::TimeWait { .. } => {}
            State::Connecting { .. } => {
                let rst = TcpSegment {
                    seq: 0,
                    ack: Some(self.irs.wrapping_add(1)),
                    rst: true,
                    ..TcpSegment::default()
                };
                ctx.send(&rst);
                ctx.stats.tcp_resets_sent += 1;
                ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
            }
            State::SynSent { .. } | State::SynReceived | State::Open => {
                // The peer accepts a RST only at exactly its next expected
                // sequence number (RFC 5961). It has everything we sent
                // (`snd_max`) unless segments are still lost in flight, when
                // it expects `snd_una`; so one RST for each.
                let (max, una) = (self.snd_max, self.snd_una);
                let seqs = if max == una {
                    &[max][..]
                } else {
                    &[max, una][..]
                };
                let peer_done = self.peer_done;
                for &seq in seqs.iter().filter(|_| !peer_done) {
                    let mut segment = self.header(ctx.settings, seq);
                    segment.rst = true;
                    ctx.send(&segment);
                    ctx.stats.tcp_resets_sent += 1;
                }
                ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
            }
        }
        Alive::No
    }

    // ---- timers --------------------------------------------------------------

    /// Runs whatever is due at `now`.
    pub(super) fn on_timer(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Alive {
        match self.state {
            State::Connecting { since } => {
                if now >= since + ctx.settings.connect_timeout {
                    tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP connect timed out");
                    ctx.stats.tcp_connect_timeouts += 1;
                    ctx.action(SocketAction::TcpClose { flow: ctx.flow });
                    return Alive::No;
                }
                return Alive::Yes;
            }
            State::SynSent { since } => return self.on_syn_sent_timer(now, since, ctx),
            State::TimeWait { until } => {
                return if now >= until { Alive::No } else { Alive::Yes };
            }
            State::SynReceived | State::Open => {}
        }
        let idle = match self.inbound != Inbound::Open || self.host_eof {
            true => ctx.settings.idle_timeout.min(HALF_CLOSED_IDLE),
            false => ctx.settings.idle_timeout,
        };
        if now >= self.last_activity + idle {
            tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP connection idle: reset");
            ctx.stats.tcp_idle_closed += 1;
            return self.abort(ctx);
        }
        if self.delayed_ack_at.is_some_and(|at| now >= at) {
            self.delayed_ack_at = None;
            self.ack_due = true;
            self.wake(ctx);
        }
        match self.rto_at {
            Some(at) if now >= at => self.on_rto(now, ctx),
            _ => Alive::Yes,
        }
    }

    fn on_rto(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Alive {
        self.retries += 1;
        let limit = match self.state {
            State::SynReceived => MAX_SYNACK_RETRIES,
            _ => MAX_RETRIES,
        };
        if self.retries > limit {
            tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP peer stopped answering: reset");
            ctx.stats.tcp_retransmit_timeouts += 1;
            return self.abort(ctx);
        }
        self.rto.backoff();
        self.rto_at = Some(now + self.rto.get());
        self.rtt_probe = None;
        if self.state == State::SynReceived {
            self.syn_ack_due = true;
        } else {
            let flight = dist(self.snd_una, self.snd_max);
            if flight == 0 && !self.has_unsent() {
                self.rto_at = None;
                return Alive::Yes;
            }
            self.ssthresh = (flight / 2).max(2 * self.mss);
            self.cwnd = self.mss;
            self.snd_nxt = self.snd_una;
            self.recover = None;
            self.retransmit_one = false;
            self.dupacks = 0;
            self.probe = self.snd_wnd == 0;
        }
        self.wake(ctx);
        Alive::Yes
    }

    // ---- segments from the peer ----------------------------------------------

    /// A segment from the peer for this connection.
    pub(super) fn on_segment(
        &mut self,
        now: Instant,
        seg: &TcpSegment<'_>,
        ctx: &mut Ctx<'_>,
    ) -> Alive {
        match self.state {
            State::Connecting { .. } => {
                if seg.rst && seg.seq == self.rcv_nxt {
                    ctx.action(SocketAction::TcpClose { flow: ctx.flow });
                    return Alive::No;
                }
                // A retransmitted SYN, or anything else: the connect is
                // still pending, nothing to say yet.
                return Alive::Yes;
            }
            State::SynSent { .. } => return self.on_syn_sent_segment(now, seg, ctx),
            State::TimeWait { .. } => {
                if seg.rst {
                    return Alive::No;
                }
                if seg.fin {
                    self.ack_due = true;
                    self.wake(ctx);
                }
                return Alive::Yes;
            }
            State::SynReceived | State::Open => {}
        }
        if self.peer_done {
            return Alive::Yes;
        }
        if seg.rst {
            return self.on_rst(seg, ctx);
        }
        if seg.syn {
            if self.state == State::SynReceived && seg.seq == self.irs {
                // The peer did not get our SYN-ACK.
                self.syn_ack_due = true;
            } else {
                // RFC 5961 §4: a challenge ACK, nothing else.
                self.ack_due = true;
            }
            self.wake(ctx);
            return Alive::Yes;
        }
        let Some(ack) = seg.ack else {
            ctx.stats.tcp_segments_dropped += 1;
            return Alive::Yes;
        };
        self.last_activity = now;
        if self.state == State::SynReceived {
            if ack != self.iss.wrapping_add(1) {
                // Not for our SYN-ACK: RFC 793 answers with a RST from ack.
                ctx.send(&TcpSegment {
                    seq: ack,
                    rst: true,
                    ..TcpSegment::default()
                });
                ctx.stats.tcp_resets_sent += 1;
                return Alive::Yes;
            }
            self.establish(now, seg, ctx);
        }
        if !self.on_ack(now, seg, ack, ctx) {
            return Alive::Yes;
        }
        self.on_payload(now, seg, ctx);
        self.maybe_finish(now, ctx)
    }

    fn on_rst(&mut self, seg: &TcpSegment<'_>, ctx: &mut Ctx<'_>) -> Alive {
        if seg.seq == self.rcv_nxt && self.inbound == Inbound::FinReceived && self.fin_acked {
            // Every byte and FIN is acknowledged both ways: the peer's end is
            // closed and this RST can only answer a stray segment (a
            // duplicate ACK after our ACK of its FIN). It says nothing about
            // the bytes we acknowledged, which still go to the host (RFC 1337
            // treats a RST in TIME-WAIT the same way).
            tracing::debug!(
                flow = ctx.flow.0,
                peer = %ctx.peer,
                remote = %ctx.remote,
                unwritten = self.unwritten,
                "TCP reset by the peer after both FINs: writing the rest"
            );
            self.peer_done = true;
            self.ack_due = false;
            self.delayed_ack_at = None;
            self.probe = false;
            self.rto_at = None;
            return Alive::Yes;
        }
        if seg.seq == self.rcv_nxt {
            tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP reset by the peer");
            ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
            return Alive::No;
        }
        let offset = dist(self.rcv_nxt, seg.seq);
        if offset < self.advertised_window(ctx.settings).max(1) {
            // In the window but not exact: RFC 5961 §3 challenge ACK.
            self.ack_due = true;
            self.wake(ctx);
        }
        Alive::Yes
    }

    fn establish(&mut self, now: Instant, seg: &TcpSegment<'_>, ctx: &mut Ctx<'_>) {
        self.state = State::Open;
        let seq = self.iss.wrapping_add(1);
        self.snd_una = seq;
        self.snd_nxt = seq;
        self.snd_max = seq;
        if self.retries == 0
            && let Some((_, sent)) = self.rtt_probe
        {
            self.rto.sample(now.saturating_duration_since(sent));
        }
        self.rtt_probe = None;
        self.retries = 0;
        self.rto_at = None;
        self.snd_wnd = u32::from(seg.window) << self.peer_wscale;
        self.snd_wl1 = seg.seq;
        self.snd_wl2 = seq;
        ctx.stats.tcp_established += 1;
        tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP connection established");
        if self.has_unsent() {
            self.arm_persist(now);
            self.wake(ctx);
        }
    }

    /// Processes the acknowledgment and window of `seg`. Returns false if
    /// the segment must be dropped (it acknowledges what was never sent).
    fn on_ack(&mut self, now: Instant, seg: &TcpSegment<'_>, ack: u32, ctx: &mut Ctx<'_>) -> bool {
        if lt(self.snd_max, ack) {
            self.ack_due = true;
            self.wake(ctx);
            ctx.stats.tcp_segments_dropped += 1;
            return false;
        }
        let window = u32::from(seg.window) << self.peer_wscale;
        let flight = dist(self.snd_una, self.snd_max);
        if lt(self.snd_una, ack) {
            self.ack_new(now, ack, ctx);
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && !seg.fin
            && window == self.snd_wnd
            && flight > 0
        {
            self.dupack(ctx);
        }
        // RFC 793 window update rule: from a newer segment, or a newer ACK.
        if lt(self.snd_wl1, seg.seq) || (self.snd_wl1 == seg.seq && le(self.snd_wl2, ack)) {
            let opened = window > self.snd_wnd;
            if opened && self.snd_wnd == 0 && ack == self.snd_una {
                // The peer dropped our zero-window probe: it goes again with
                // the rest.
                self.snd_nxt = self.snd_una;
            }
            if window == 0 && ack == self.snd_una && self.snd_wnd == 0 {
                // The peer answers our probes: it is alive.
                self.retries = 0;
            }
            self.snd_wnd = window;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            if opened && self.has_unsent() {
                self.probe = false;
                self.wake(ctx);
            }
            self.arm_persist(now);
        }
        true
    }

    fn ack_new(&mut self, now: Instant, ack: u32, ctx: &mut Ctx<'_>) {
        let acked = dist(self.snd_una, ack);
        let data = (acked as usize).min(self.send_buf.len());
        // An emptied buffer is freed: an idle connection keeps none.
        self.send_buf.consume(data);
        if acked as usize > data && self.host_eof {
            self.fin_acked = true;
        }
        self.snd_una = ack;
        if lt(self.snd_nxt, ack) {
            self.snd_nxt = ack;
        }
        if let Some((probe_end, sent)) = self.rtt_probe
            && le(probe_end, ack)
        {
            self.rto.sample(now.saturating_duration_since(sent));
            self.rtt_probe = None;
        }
        self.retries = 0;
        self.probe = false;
        match self.recover {
            Some(recover) if lt(ack, recover) => {
                // NewReno partial ACK: the next hole is lost too.
                self.retransmit_one = true;
                self.wake(ctx);
            }
            Some(_) => {
                self.recover = None;
                self.cwnd = self.ssthresh;
                self.dupacks = 0;
            }
            None => {
                self.dupacks = 0;
                if self.cwnd < self.ssthresh {
                    self.cwnd = self.cwnd.saturating_add(acked.min(self.mss));
                } else {
                    let step = (self.mss * self.mss / self.cwnd.max(1)).max(1);
                    self.cwnd = self.cwnd.saturating_add(step);
                }
            }
        }
        self.rto_at = (self.snd_una != self.snd_max).then(|| now + self.rto.get());
        if self.has_unsent() {
            self.wake(ctx);
        }
        self.grant_credit(ctx);
    }

    fn dupack(&mut self, ctx: &mut Ctx<'_>) {
        self.dupacks = self.dupacks.saturating_add(1);
        if self.recover.is_some() {
            // Each duplicate means a segment left the network.
            self.cwnd = self.cwnd.saturating_add(self.mss);
            self.wake(ctx);
        } else if self.dupacks == DUPACK_THRESHOLD && self.snd_nxt == self.snd_max {
            let flight = dist(self.snd_una, self.snd_max);
            self.ssthresh = (flight / 2).max(2 * self.mss);
            self.cwnd = self.ssthresh + 3 * self.mss;
            self.recover = Some(self.snd_max);
            self.retransmit_one = true;
            self.rtt_probe = None;
            ctx.stats.tcp_fast_retransmits += 1;
            self.wake(ctx);
        }
    }

    /// Accepts the payload and FIN of `seg` that fall in our window.
    fn on_payload(&mut self, now: Instant, seg: &TcpSegment<'_>, ctx: &mut Ctx<'_>) {
        if seg.payload.is_empty() && !seg.fin {
            return;
        }
        if self.inbound != Inbound::Open {
            // Nothing may follow the peer's FIN; a retransmitted FIN gets
            // its ACK again.
            self.ack_due = true;
            self.wake(ctx);
            return;
        }
        let window = ctx.settings.buffer.saturating_sub(self.unwritten) as u32;
        let (mut seq, mut data, mut fin) = (seg.seq, seg.payload, seg.fin);
        // Whether this segment's ACK goes at once whatever else holds: it
        // repeats bytes we had, is cut at our window, or fills a hole.
        let mut urgent = false;
        if lt(seq, self.rcv_nxt) {
            let skip = dist(seq, self.rcv_nxt) as usize;
            if skip > data.len() || (skip == data.len() && !fin) {
                // Entirely old: the peer missed our ACK.
                self.owe_ack(ctx);
                return;
            }
            data = &data[skip..];
            seq = self.rcv_nxt;
            urgent = true;
        }
        let offset = dist(self.rcv_nxt, seq);
        if offset > 0 && offset >= window {
            // Starts beyond the window.
            ctx.stats.tcp_segments_dropped += 1;
            self.owe_ack(ctx);
            return;
        }
        let room = window.saturating_sub(offset) as usize;
        if data.len() > room {
            data = &data[..room];
            fin = false;
            urgent = true;
            if data.is_empty() {
                // A zero window: nothing fits.
                ctx.stats.tcp_segments_dropped += 1;
                self.owe_ack(ctx);
                return;
            }
        }
        if offset > 0 {
            // Copied: it may wait long, and the packet's buffer goes back
            // to the tunnel's pool only once nothing views it.
            self.store_ooo(seq, Bytes::copy_from_slice(data), fin, ctx);
            self.owe_ack(ctx);
            return;
        }
        urgent |= !self.ooo.is_empty() || self.ooo_fin.is_some();
        if !data.is_empty() {
            self.deliver(packet::share(seg.packet, data), ctx);
        }
        if fin {
            self.ooo_fin = Some(self.rcv_nxt);
        }
        self.drain_ooo(ctx);
        if self.ooo_fin == Some(self.rcv_nxt) {
            self.peer_fin(now, ctx);
        }
        self.ack_in_order(now, seg.payload.len() as u32, urgent, ctx);
    }

    /// Acknowledges in-order data just accepted from a segment of `len`
    /// bytes. At once if `urgent` (see [`Conn::on_payload`]), if the
    /// segment brought the peer's FIN, if it is short, or once more than
    /// a full segment (the MSS we advertised) is unacknowledged, which in a
    /// stream of full segments means every second one (RFC 1122 §4.2.3.2,
    /// RFC 5681 §4.2; Linux's `__tcp_ack_snd_check` counts the same).
    /// Otherwise the ACK waits [`DELAYED_ACK`] for the next segment or for
    /// data of ours to carry it: every segment we send carries our ACK
    /// ([`Conn::header`]).
    ///
    /// A short segment (below the largest the peer has sent, or below
    /// [`DEFAULT_MSS`]) ends a write, and the peer's Nagle algorithm may
    /// hold its next small write until this one is acknowledged: delayed,
    /// a request written in two parts took 2.4 ms instead of 1.0 through
    /// the benchmark's rig. Delaying it gained nothing measurable either:
    /// a short request answered within the delay would have its ACK
    /// carried by the answer, and the benchmark's short connections took
    /// as long both ways. Linux acknowledges such a segment once the
    /// application reads it, unless the connection is interactive; ours
    /// is read (handed to the driver) at once.
    fn ack_in_order(&mut self, now: Instant, len: u32, urgent: bool, ctx: &mut Ctx<'_>) {
        let advertised = ctx.settings.mss_for(ctx.peer);
        self.rcv_mss = self.rcv_mss.max(len.min(advertised));
        let short = len < self.rcv_mss.max(DEFAULT_MSS.min(advertised));
        let unacked = dist(self.rcv_acked, self.rcv_nxt);
        if urgent || short || self.inbound != Inbound::Open || unacked > advertised {
            self.ack_due = true;
            self.wake(ctx);
        } else {
            self.delayed_ack_at.get_or_insert(now + DELAYED_ACK);
        }
    }

    fn deliver(&mut self, data: Bytes, ctx: &mut Ctx<'_>) {
        self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
        self.unwritten += data.len();
        ctx.action(SocketAction::TcpWrite {
            flow: ctx.flow,
            data,
        });
    }

    fn store_ooo(&mut self, seq: u32, data: Bytes, fin: bool, ctx: &mut Ctx<'_>) {
        if fin {
            self.ooo_fin = Some(seq.wrapping_add(data.len() as u32));
        }
        if data.is_empty()
            || self
                .ooo
                .iter()
                .any(|(s, d)| *s == seq && d.len() >= data.len())
        {
            return;
        }
        if self.ooo.len() >= MAX_OOO_SEGMENTS {
            ctx.stats.tcp_segments_dropped += 1;
            return;
        }
        self.ooo.push((seq, data));
    }

    /// Delivers the out-of-order segments that the last delivery made
    /// contiguous.
    fn drain_ooo(&mut self, ctx: &mut Ctx<'_>) {
        while let Some(i) = self.ooo.iter().position(|(s, _)| le(*s, self.rcv_nxt)) {
            let (seq, data) = self.ooo.swap_remove(i);
            let skip = dist(seq, self.rcv_nxt) as usize;
            if skip < data.len() {
                self.deliver(data.slice(skip..), ctx);
            }
        }
        if self.ooo.is_empty() && self.ooo.capacity() > 0 {
            self.ooo = Vec::new();
        }
    }

    fn peer_fin(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
        self.ooo_fin = None;
        self.ooo = Vec::new();
        tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP FIN from the peer");
        if self.unwritten == 0 {
            self.inbound = Inbound::Shut;
            ctx.action(SocketAction::TcpShutdownWrite { flow: ctx.flow });
        } else {
            self.inbound = Inbound::FinReceived;
        }
        self.last_activity = now;
    }

    /// Ends the connection once both directions are closed and acknowledged.
    fn maybe_finish(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Alive {
        if self.state != State::Open || self.inbound != Inbound::Shut || !self.fin_acked {
            return Alive::Yes;
        }
        ctx.action(SocketAction::TcpClose { flow: ctx.flow });
        ctx.stats.tcp_closed += 1;
        tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, remote = %ctx.remote, "TCP connection closed");
        if self.closed_first && !self.peer_done {
            self.state = State::TimeWait {
                until: now + TIME_WAIT,
            };
            self.rto_at = None;
            self.send_buf.clear();
            Alive::Yes
        } else {
            Alive::No
        }
    }
}
