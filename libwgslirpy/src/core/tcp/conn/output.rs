//! Output of a connection: what to send to the peer, and when.
//!
//! Segments are made lazily: [`Conn::poll_segment`] cuts one at a time,
//! when the router's caller has room in the tunnel, from the send buffer
//! within the peer's window and the congestion window, with the current
//! ACK and window on every segment.

use std::time::Instant;

use bytes::BytesMut;

use super::{Alive, Conn, Ctx, Inbound, MAX_ACKS_OWED, State};
use crate::core::SocketAction;
use crate::core::packet::{self, TcpSegment};
use crate::core::tcp::Settings;
use crate::core::tcp::seq::{dist, lt};

impl Conn {
    /// Whether there are bytes or a FIN not yet sent.
    pub(super) fn has_unsent(&self) -> bool {
        let sent = dist(self.snd_una, self.snd_nxt) as usize;
        sent < self.send_buf.len()
            || (self.host_eof && !self.fin_acked && sent == self.send_buf.len())
    }

    /// Arms the persist timer when the peer's zero window blocks us.
    pub(super) fn arm_persist(&mut self, now: Instant) {
        if self.state == State::Open
            && self.rto_at.is_none()
            && self.snd_wnd == 0
            && self.snd_una == self.snd_max
            && self.has_unsent()
        {
            self.rto_at = Some(now + self.rto.get());
        }
    }

    /// The window we offer now, in bytes (a multiple of our scale unit).
    pub(super) fn advertised_window(&self, settings: &Settings) -> u32 {
        let free = settings.buffer.saturating_sub(self.unwritten) as u32;
        (free >> self.our_wscale).min(u32::from(u16::MAX)) << self.our_wscale
    }

    /// Lets the driver read more once a useful amount of buffer is free.
    pub(super) fn grant_credit(&mut self, ctx: &mut Ctx<'_>) {
        if self.host_eof {
            return;
        }
        let buffer = ctx.settings.buffer;
        let free = buffer.saturating_sub(self.send_buf.len() + self.credit);
        if free > 0 && (free >= buffer / 4 || self.credit == 0 && self.send_buf.is_empty()) {
            self.credit += free;
            ctx.action(SocketAction::TcpRead {
                flow: ctx.flow,
                max: free,
            });
        }
    }

    /// Owes the peer a pure ACK of its own for the segment just received (a
    /// duplicate ACK, or the answer to a probe). It is made with the other
    /// segments, when the tunnel has room, carrying the window of that
    /// moment. Made eagerly, it went through the transmit queue, which
    /// drops when full, after `header` had recorded the window it
    /// advertised: a later opening smaller than a segment past that record
    /// then sent no update, and the peer waited for its persist timer.
    pub(super) fn owe_ack(&mut self, ctx: &mut Ctx<'_>) {
        self.acks_owed = self.acks_owed.saturating_add(1).min(MAX_ACKS_OWED);
        self.wake(ctx);
    }

    /// The sequence number for a segment without data (an ACK, a RST):
    /// `snd_nxt`, unless that lies beyond the peer's window, as it does
    /// after a zero-window probe. A receiver drops a segment outside its
    /// window, ACK and all (RFC 793's acceptability test), so an ACK sent
    /// from there would never reach the peer while its window stays shut:
    /// it would go on retransmitting what we have already received, and
    /// neither side would move again. Linux's `tcp_acceptable_seq` picks the
    /// window's edge the same way.
    pub(super) fn dataless_seq(&self) -> u32 {
        let window_end = self.snd_una.wrapping_add(self.snd_wnd);
        if lt(window_end, self.snd_nxt) {
            window_end
        } else {
            self.snd_nxt
        }
    }

    /// A segment carrying our current ACK and window: whatever ACK was
    /// due or delayed is sent with it.
    pub(super) fn header(&mut self, settings: &Settings, seq: u32) -> TcpSegment<'static> {
        let window = self.advertised_window(settings);
        self.adv_edge = self.rcv_nxt.wrapping_add(window);
        self.rcv_acked = self.rcv_nxt;
        self.ack_due = false;
        self.delayed_ack_at = None;
        TcpSegment {
            seq,
            ack: Some(self.rcv_nxt),
            window: (window >> self.our_wscale) as u16,
            ..TcpSegment::default()
        }
    }

    pub(super) fn send_rst(&mut self, ctx: &mut Ctx<'_>) {
        let mut segment = self.header(ctx.settings, self.dataless_seq());
        segment.rst = true;
        ctx.send(&segment);
        ctx.stats.tcp_resets_sent += 1;
    }

    /// Resets both sides.
    pub(super) fn abort(&mut self, ctx: &mut Ctx<'_>) -> Alive {
        if !self.peer_done {
            self.send_rst(ctx);
        }
        ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
        Alive::No
    }

    /// Whether [`Conn::poll_segment`] has something to send.
    pub(in crate::core::tcp) fn wants_to_send(&self) -> bool {
        match self.state {
            State::Connecting { .. } => false,
            State::SynSent { .. } => self.syn_due,
            State::SynReceived => self.syn_ack_due,
            State::TimeWait { .. } => self.ack_due,
            State::Open if self.peer_done => false,
            State::Open => {
                self.ack_due
                    || self.acks_owed > 0
                    || self.retransmit_one
                    || self.sendable() > 0
                    || self.fin_ready()
            }
        }
    }

    /// New bytes that the windows let us send now.
    pub(super) fn sendable(&self) -> usize {
        let sent = dist(self.snd_una, self.snd_nxt) as usize;
        let unsent = self.send_buf.len().saturating_sub(sent);
        let window = self.snd_wnd.min(self.cwnd) as usize;
        let mut allowed = window.saturating_sub(sent);
        if self.probe && self.snd_wnd == 0 && sent == 0 {
            allowed = 1;
        }
        unsent.min(allowed)
    }

    /// Whether the FIN is next and not yet sent.
    pub(super) fn fin_ready(&self) -> bool {
        self.host_eof
            && !self.fin_acked
            && dist(self.snd_una, self.snd_nxt) as usize == self.send_buf.len()
    }

    /// The next segment for the peer, if any.
    pub(in crate::core::tcp) fn poll_segment(
        &mut self,
        now: Instant,
        ctx: &mut Ctx<'_>,
    ) -> Option<BytesMut> {
        match self.state {
            State::Connecting { .. } => None,
            State::SynSent { .. } => self.poll_syn(now, ctx),
            State::SynReceived => {
                if !self.syn_ack_due {
                    return None;
                }
                self.syn_ack_due = false;
                let mut segment = self.header(ctx.settings, self.iss);
                segment.syn = true;
                segment.mss = Some(ctx.settings.mss_for(ctx.peer) as u16);
                // The window of a SYN is never scaled (RFC 7323 §2.2).
                segment.window = self.advertised_window(ctx.settings).min(65535) as u16;
                if self.wscale_ok {
                    segment.wscale = Some(self.our_wscale);
                }
                self.snd_nxt = self.iss.wrapping_add(1);
                self.snd_max = self.snd_nxt;
                if self.rtt_probe.is_none() && self.retries == 0 {
                    self.rtt_probe = Some((self.snd_nxt, now));
                }
                self.rto_at.get_or_insert(now + self.rto.get());
                packet::build_tcp(ctx.remote, ctx.peer, &segment)
            }
            State::TimeWait { .. } => {
                if !self.ack_due {
                    return None;
                }
                let segment = self.header(ctx.settings, self.dataless_seq());
                packet::build_tcp(ctx.remote, ctx.peer, &segment)
            }
            State::Open if self.peer_done => None,
            State::Open => self.poll_open(now, ctx),
        }
    }

    pub(super) fn poll_open(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Option<BytesMut> {
        let (seq, len) = if self.retransmit_one {
            self.retransmit_one = false;
            let len = (dist(self.snd_una, self.snd_max) as usize)
                .min(self.send_buf.len())
                .min(self.mss as usize);
            (self.snd_una, len)
        } else {
            (self.snd_nxt, self.sendable().min(self.mss as usize))
        };
        let offset = dist(self.snd_una, seq) as usize;
        // The FIN follows the last byte; a retransmission carries it only if
        // it was sent before.
        let send_fin = self.host_eof
            && !self.fin_acked
            && offset + len == self.send_buf.len()
            && (seq == self.snd_nxt
                || dist(self.snd_una, self.snd_max) as usize > self.send_buf.len());
        if len == 0 && !send_fin {
            if !self.ack_due && self.acks_owed == 0 {
                return None;
            }
            self.acks_owed = self.acks_owed.saturating_sub(1);
            let segment = self.header(ctx.settings, self.dataless_seq());
            return packet::build_tcp(ctx.remote, ctx.peer, &segment);
        }
        let mut segment = self.header(ctx.settings, seq);
        segment.fin = send_fin;
        let spanning;
        segment.payload = match self.send_buf.range(offset, len) {
            (bytes, []) => bytes,
            // Across the ring's wrap: copied, which happens once a lap,
            // instead of rotating the whole buffer.
            (front, back) => {
                spanning = [front, back].concat();
                &spanning
            }
        };
        let packet = packet::build_tcp(ctx.remote, ctx.peer, &segment);
        let end = seq.wrapping_add(len as u32 + u32::from(send_fin));
        if lt(seq, self.snd_max) {
            ctx.stats.tcp_retransmits += 1;
        } else if self.rtt_probe.is_none() {
            self.rtt_probe = Some((end, now));
        }
        if lt(self.snd_nxt, end) {
            self.snd_nxt = end;
        }
        if lt(self.snd_max, end) {
            self.snd_max = end;
        }
        if send_fin && self.inbound == Inbound::Open {
            self.closed_first = true;
        }
        if self.snd_wnd == 0 {
            self.probe = false;
        }
        self.rto_at.get_or_insert(now + self.rto.get());
        packet
    }
}
