//! Active open, for reverse forwards (`-t`): we send the SYN.
//!
//! The host-side client is already connected (accepted) when the
//! connection is made, in *SynSent*. Our SYN offers our MSS and window
//! scale and goes again on the RTO with exponential backoff (1, 2, 4, ...
//! seconds) until `--tcp-connect-timeout`. The peer's RST for it means
//! DEST refused, and no SYN-ACK by the timeout means DEST is not there:
//! either way the host socket is aborted (the client sees a RST) at once.
//! A SYN-ACK that acknowledges our SYN establishes the connection: we ACK
//! it, grant the driver its first read credit, and from then on it is
//! *Open* like any other. Not supported: simultaneous open (a bare SYN in
//! SynSent is dropped) and data on the SYN-ACK (left unacknowledged, so
//! the peer sends it again).

use std::time::Instant;

use bytes::BytesMut;

use super::{Alive, Conn, Ctx, State};
use crate::core::SocketAction;
use crate::core::packet::{self, TcpSegment};
use crate::core::tcp::Settings;

impl Conn {
    /// A connection that we open toward the peer, with our initial
    /// sequence number `iss` and the MSS the tunnel carries, `our_mss`.
    /// Its SYN is due at once.
    pub(in crate::core::tcp) fn new_active(
        now: Instant,
        iss: u32,
        our_mss: u32,
        settings: &Settings,
    ) -> Self {
        let mss = our_mss.max(64);
        Conn {
            // Offered in our SYN; kept only if the SYN-ACK offers it too.
            wscale_ok: true,
            syn_due: true,
            ..Conn::opening(
                State::SynSent { since: now },
                now,
                iss,
                mss,
                settings.wscale,
            )
        }
    }

    /// Our SYN, if it is due.
    pub(super) fn poll_syn(&mut self, now: Instant, ctx: &mut Ctx<'_>) -> Option<BytesMut> {
        if !self.syn_due {
            return None;
        }
        self.syn_due = false;
        let segment = TcpSegment {
            seq: self.iss,
            syn: true,
            // The window of a SYN is never scaled (RFC 7323 §2.2).
            window: self.advertised_window(ctx.settings).min(65535) as u16,
            mss: Some(self.mss as u16),
            wscale: Some(self.our_wscale),
            ..TcpSegment::default()
        };
        self.snd_nxt = self.iss.wrapping_add(1);
        self.snd_max = self.snd_nxt;
        if self.rtt_probe.is_none() && self.retries == 0 {
            self.rtt_probe = Some((self.snd_nxt, now));
        }
        self.rto_at.get_or_insert(now + self.rto.get());
        packet::build_tcp(ctx.remote, ctx.peer, &segment)
    }

    /// A segment from the peer while our SYN waits for an answer (RFC 793,
    /// "SYN-SENT STATE").
    pub(super) fn on_syn_sent_segment(
        &mut self,
        now: Instant,
        seg: &TcpSegment<'_>,
        ctx: &mut Ctx<'_>,
    ) -> Alive {
        let ours = self.iss.wrapping_add(1);
        match seg.ack {
            Some(ack) if ack != ours => {
                // Not about our SYN: a RST from its ACK number.
                if !seg.rst {
                    ctx.send(&TcpSegment {
                        seq: ack,
                        rst: true,
                        ..TcpSegment::default()
                    });
                    ctx.stats.tcp_resets_sent += 1;
                }
                return Alive::Yes;
            }
            Some(_) if seg.rst => {
                tracing::debug!(flow = ctx.flow.0, dest = %ctx.peer, "reverse TCP connection refused");
                ctx.stats.tcp_forward_refused += 1;
                ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
                return Alive::No;
            }
            Some(_) if seg.syn => {}
            _ => {
                // A RST without ACK, a bare SYN (simultaneous open) or
                // anything else.
                ctx.stats.tcp_segments_dropped += 1;
                return Alive::Yes;
            }
        }
        self.irs = seg.seq;
        self.rcv_nxt = seg.seq.wrapping_add(1);
        self.adv_edge = self.rcv_nxt;
        self.rcv_acked = self.rcv_nxt;
        match seg.wscale {
            Some(ws) => self.peer_wscale = ws.min(14),
            None => {
                self.wscale_ok = false;
                self.our_wscale = 0;
            }
        }
        let default_mss = if ctx.peer.is_ipv6() { 1220 } else { 536 };
        self.mss = u32::from(seg.mss.unwrap_or(default_mss))
            .min(self.mss)
            .max(64);
        self.cwnd = 10 * self.mss;
        self.state = State::Open;
        self.last_activity = now;
        self.snd_una = ours;
        self.snd_nxt = ours;
        self.snd_max = ours;
        if self.retries == 0
            && let Some((_, sent)) = self.rtt_probe
        {
            self.rto.sample(now.saturating_duration_since(sent));
        }
        self.rtt_probe = None;
        self.retries = 0;
        self.rto_at = None;
        // The window of a SYN is never scaled.
        self.snd_wnd = u32::from(seg.window);
        self.snd_wl1 = seg.seq;
        self.snd_wl2 = ours;
        ctx.stats.tcp_established += 1;
        tracing::debug!(flow = ctx.flow.0, peer = %ctx.peer, source = %ctx.remote, "reverse TCP connection established");
        self.ack_due = true;
        self.wake(ctx);
        self.grant_credit(ctx);
        Alive::Yes
    }

    /// The timer in SynSent: give up at the connect timeout, else send the
    /// SYN again when the RTO has passed.
    pub(super) fn on_syn_sent_timer(
        &mut self,
        now: Instant,
        since: Instant,
        ctx: &mut Ctx<'_>,
    ) -> Alive {
        if now >= since + ctx.settings.connect_timeout {
            tracing::debug!(flow = ctx.flow.0, dest = %ctx.peer, "reverse TCP connection: no answer");
            ctx.stats.tcp_forward_timeouts += 1;
            ctx.action(SocketAction::TcpAbort { flow: ctx.flow });
            return Alive::No;
        }
        if self.rto_at.is_some_and(|at| now >= at) {
            self.retries = self.retries.saturating_add(1);
            self.rto.backoff();
            self.rto_at = Some(now + self.rto.get());
            self.rtt_probe = None;
            self.syn_due = true;
            ctx.stats.tcp_retransmits += 1;
            self.wake(ctx);
        }
        Alive::Yes
    }
}
