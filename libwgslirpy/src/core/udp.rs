//! UDP NAT: peer datagrams out through host sockets, replies back.
//!
//! Theory of operation:
//! - Mapping is endpoint-independent (RFC 4787): all datagrams from one
//!   peer-side endpoint (inner source address and port) leave through one
//!   host socket, whatever their destination, and a datagram from any remote
//!   that reaches that socket goes back to the endpoint. This is what lets
//!   hole punching work.
//! - The first datagram from an endpoint creates a flow: the core asks the
//!   driver to open a socket ([`SocketAction::UdpOpen`]), then to send
//!   ([`SocketAction::UdpSend`]). The driver opens sockets synchronously, so
//!   the send always finds its socket; if the open fails, the driver reports
//!   it and the flow is removed.
//! - Flows are bounded per peer ([`FlowTable`]): a peer that holds
//!   `--max-udp-flows` flows and opens one more loses its own least
//!   recently used flow (never another peer's), and a flow idle in both
//!   directions for the idle timeout is closed ([`SocketAction::UdpClose`]).
//!   Evictions are counted and logged at most once per
//!   [`super::limit::LIMIT_LOG_INTERVAL`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::flows::{FlowId, FlowTable};
use super::limit::LimitLog;
use super::peers::PeerId;
use super::{SocketAction, Stats};

/// The UDP flow table and its policy.
pub struct UdpNat {
    flows: FlowTable<SocketAddr, ()>,
    evict_log: LimitLog,
}

impl UdpNat {
    /// A table of at most `max_flows` flows per peer that close after
    /// `idle_timeout`.
    pub fn new(max_flows: usize, idle_timeout: Duration) -> Self {
        UdpNat {
            flows: FlowTable::new(max_flows, idle_timeout),
            evict_log: LimitLog::default(),
        }
    }

    /// A datagram from the peer-side endpoint `src`, of peer `owner`, to
    /// `dst`.
    #[allow(clippy::too_many_arguments)]
    pub fn outbound(
        &mut self,
        now: Instant,
        owner: PeerId,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Bytes,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        let flow = match self.flows.lookup(&src) {
            Some(flow) => {
                self.flows.touch(flow, now);
                flow
            }
            None => {
                let (flow, evicted) = self.flows.insert(owner, src, (), now);
                if let Some((old, old_src, ())) = evicted {
                    tracing::debug!(flow = old.0, peer = %old_src, "UDP flow evicted: table full");
                    stats.udp_flows_evicted += 1;
                    if let Some(evicted) = self.evict_log.hit(now) {
                        tracing::warn!(
                            evicted,
                            "--max-udp-flows reached by a peer: its least recently used UDP flows closed"
                        );
                    }
                    actions.push_back(SocketAction::UdpClose { flow: old });
                }
                tracing::debug!(flow = flow.0, peer = %src, remote = %dst, "new UDP flow");
                stats.udp_flows_opened += 1;
                actions.push_back(SocketAction::UdpOpen {
                    flow,
                    ipv6: src.is_ipv6(),
                });
                flow
            }
        };
        actions.push_back(SocketAction::UdpSend {
            flow,
            dest: dst,
            payload,
        });
    }

    /// A datagram from `from` (an address in canonical form) arrived on the
    /// socket of `flow`. Returns the peer-side endpoint to deliver it to, or
    /// `None` if the flow is gone or `from` is of the other IP version.
    pub fn inbound(&mut self, now: Instant, flow: FlowId, from: SocketAddr) -> Option<SocketAddr> {
        let (&peer_side, ()) = self.flows.get(flow)?;
        if from.is_ipv6() != peer_side.is_ipv6() {
            return None;
        }
        self.flows.touch(flow, now);
        Some(peer_side)
    }

    /// Forgets `flow`, whose socket the driver has already closed.
    pub fn remove(&mut self, flow: FlowId) {
        self.flows.remove(flow);
    }

    /// Closes every flow of `owner`; returns how many.
    pub fn close_owner(&mut self, owner: PeerId, actions: &mut VecDeque<SocketAction>) -> usize {
        self.flows.remove_owner(owner, |flow, _, ()| {
            actions.push_back(SocketAction::UdpClose { flow });
        })
    }

    /// The number of flows of `owner`.
    pub fn owned(&self, owner: PeerId) -> usize {
        self.flows.owned(owner)
    }

    /// Closes flows idle for the idle timeout.
    pub fn expire(
        &mut self,
        now: Instant,
        actions: &mut VecDeque<SocketAction>,
        stats: &mut Stats,
    ) {
        self.flows.expire(now, |flow, peer_side, ()| {
            tracing::debug!(flow = flow.0, peer = %peer_side, "UDP flow timed out");
            stats.udp_flows_expired += 1;
            actions.push_back(SocketAction::UdpClose { flow });
        });
    }

    /// Closes every flow (shutdown).
    pub fn close_all(&mut self, actions: &mut VecDeque<SocketAction>) {
        self.flows.drain(|flow, peer_side, ()| {
            tracing::debug!(flow = flow.0, peer = %peer_side, "UDP flow closed: shutting down");
            actions.push_back(SocketAction::UdpClose { flow });
        });
    }

    /// When the next flow times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.flows.next_expiry()
    }

    /// The number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no flows.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}
