//! ICMP echo: answered locally for the pingable addresses, forwarded for
//! everything else.
//!
//! Theory of operation:
//! - An echo request (ICMP or ICMPv6) to a pingable address (`-P`) is
//!   answered at once with an echo reply carrying the same identifier,
//!   sequence number and payload.
//! - An echo request to any other address is forwarded through a host
//!   "ping" socket. Each peer-side echo identity (the peer's address and its
//!   echo identifier) gets one socket ([`SocketAction::IcmpOpen`]), and the
//!   kernel gives each socket an identifier of its own, so many peers and
//!   many `ping` processes never collide. Sequence numbers and payloads pass
//!   through unchanged; replies get the peer's own identifier back, and
//!   arrive when the real reply does, so the peer sees the real round-trip
//!   time.
//! - Echo identities are bounded per peer ([`FlowTable`]): a peer at
//!   `--max-icmp-ids` loses its own least recently used identity (counted, and logged at most once per
//!   [`super::limit::LIMIT_LOG_INTERVAL`]), and an identity idle for the idle
//!   timeout closes.
//! - Other ICMP messages from the peer are not forwarded.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::flows::{FlowId, FlowTable};
use super::limit::LimitLog;
use super::peers::PeerId;
use super::{SocketAction, Stats, packet};

/// Answers an echo request from `src` to `dst` if `dst` is pingable.
/// Returns `None` when it is not ours to answer.
pub fn answer_echo(
    pingable: &[IpAddr],
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Option<BytesMut> {
    if !pingable.contains(&dst) {
        return None;
    }
    packet::build_echo_reply(dst, src, ident, seq_no, data)
}

/// A peer-side echo identity: the peer's address and its echo identifier.
type EchoKey = (IpAddr, u16);

/// Echo requests forwarded through host ping sockets.
pub struct EchoNat {
    flows: FlowTable<EchoKey, ()>,
    evict_log: LimitLog,
}

impl EchoNat {
    /// A table of at most `max_ids` echo identities per peer, closed after
    /// `idle_timeout`.
    pub fn new(max_ids: usize, idle_timeout: Duration) -> Self {
        EchoNat {
            flows: FlowTable::new(max_ids, idle_timeout),
            evict_log: LimitLog::default(),
        }
    }

    /// An echo request from `src`, of peer `owner`, to `dst`.
    #[allow(clippy::too_many_arguments)]
    pub fn outbound(
        &mut self,
        now: Instant,
        owner: PeerId,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq_no: u16,
        data: &[u8],
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        let key = (src, ident);
        let flow = match self.flows.lookup(&key) {
            Some(flow) => {
                self.flows.touch(flow, now);
                flow
            }
            None => {
                let (flow, evicted) = self.flows.insert(owner, key, (), now);
                if let Some((old, _, ())) = evicted {
                    stats.icmp_ids_evicted += 1;
                    if let Some(evicted) = self.evict_log.hit(now) {
                        tracing::warn!(
                            evicted,
                            "--max-icmp-ids reached by a peer: its least recently used echo identities closed"
                        );
                    }
                    actions.push_back(SocketAction::IcmpClose { flow: old });
                }
                tracing::debug!(flow = flow.0, peer = %src, ident, remote = %dst, "new ICMP echo identity");
                stats.icmp_ids_opened += 1;
                actions.push_back(SocketAction::IcmpOpen {
                    flow,
                    ipv6: src.is_ipv6(),
                });
                flow
            }
        };
        actions.push_back(SocketAction::IcmpSend {
            flow,
            dest: dst,
            seq_no,
            data: Bytes::copy_from_slice(data),
        });
    }

    /// An echo reply from `from` arrived on the socket of `flow`. Returns
    /// the peer's address and echo identifier to answer, or `None` if the
    /// flow is gone or `from` is of the other IP version.
    pub fn inbound(&mut self, now: Instant, flow: FlowId, from: IpAddr) -> Option<EchoKey> {
        let (&key, ()) = self.flows.get(flow)?;
        if from.is_ipv6() != key.0.is_ipv6() {
            return None;
        }
        self.flows.touch(flow, now);
        Some(key)
    }

    /// Forgets `flow`, whose socket the driver has already closed.
    pub fn remove(&mut self, flow: FlowId) {
        self.flows.remove(flow);
    }

    /// Closes every identity of `owner`; returns how many.
    pub fn close_owner(&mut self, owner: PeerId, actions: &mut VecDeque<SocketAction>) -> usize {
        self.flows.remove_owner(owner, |flow, _, ()| {
            actions.push_back(SocketAction::IcmpClose { flow });
        })
    }

    /// The number of identities of `owner`.
    pub fn owned(&self, owner: PeerId) -> usize {
        self.flows.owned(owner)
    }

    /// Closes identities idle for the idle timeout.
    pub fn expire(&mut self, now: Instant, actions: &mut VecDeque<SocketAction>) {
        self.flows.expire(now, |flow, _, ()| {
            actions.push_back(SocketAction::IcmpClose { flow });
        });
    }

    /// Closes every echo identity (shutdown).
    pub fn close_all(&mut self, actions: &mut VecDeque<SocketAction>) {
        self.flows.drain(|flow, _, ()| {
            actions.push_back(SocketAction::IcmpClose { flow });
        });
    }

    /// The number of echo identities.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no echo identities.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// When the next identity times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.flows.next_expiry()
    }
}
