//! Counters and occupancy: what the router has done, and how full it is.
//!
//! # Theory of operation
//!
//! [`Stats`] counts events for the whole router (one `u64` add each, on the
//! path that decides the event; nothing is counted twice). [`Occupancy`]
//! is computed on demand from the tables' sizes, so it cannot drift from
//! them. Flow tables are bounded per peer, so the per-peer figures,
//! [`PeerStats`] with its [`PeerOccupancy`], are what the limits in
//! [`Config`] bound; the totals are at most the number of peers times
//! those limits. The reassembly buffer and the transmit queue are shared by
//! every peer and bounded as a whole.
//!
//! The [`Router`] methods that read these figures, and
//! [`Router::set_peers`], which changes who owns what, live here too: they
//! are the router's accounting, apart from its packet paths.

use super::peers::{self, PeerCounters, PeerId};
use super::{Router, dns};
use crate::Config;
use crate::config::{Key, PeerConfig};

/// Counters of what the router has done and dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Packets received from peers.
    pub packets_in: u64,
    /// Packets queued for peers.
    pub packets_out: u64,
    /// Packets from peers that failed to parse.
    pub dropped_malformed: u64,
    /// Packets from peers using something not handled.
    pub dropped_unsupported: u64,
    /// Packets for peers that would exceed the tunnel MTU.
    pub dropped_too_big: u64,
    /// Packets for peers dropped because the transmit queue was full.
    pub dropped_queue_full: u64,
    /// Echo requests answered.
    pub echo_replies: u64,
    /// UDP flows created.
    pub udp_flows_opened: u64,
    /// UDP flows evicted because the table was full.
    pub udp_flows_evicted: u64,
    /// UDP flows closed after their idle timeout.
    pub udp_flows_expired: u64,
    /// Datagrams to the DNS server.
    pub dns_queries: u64,
    /// Datagrams to the DNS server dropped unanswered: no readable header,
    /// or not a query.
    pub dns_dropped: u64,
    /// Queries answered FORMERR or NOTIMP because they were malformed or
    /// not a standard query.
    pub dns_errors: u64,
    /// Queries answered from the host's resolver with NOERROR.
    pub dns_resolved: u64,
    /// Queries forwarded to the host's nameservers.
    pub dns_forwarded: u64,
    /// Queries answered NXDOMAIN (locally resolved names only).
    pub dns_nxdomain: u64,
    /// Queries answered SERVFAIL, for any reason.
    pub dns_servfail: u64,
    /// Queries that reached their deadline (and were answered SERVFAIL).
    pub dns_timeouts: u64,
    /// Queries refused because too many were in flight (and answered
    /// SERVFAIL).
    pub dns_over_capacity: u64,
    /// Answers sent with TC set because they did not fit.
    pub dns_truncated: u64,
    /// TCP connects started for a peer's SYN.
    pub tcp_connects: u64,
    /// TCP connects that failed (refused, unreachable, no socket...).
    pub tcp_connect_failures: u64,
    /// TCP connects dropped after the connect timeout.
    pub tcp_connect_timeouts: u64,
    /// TCP connections that completed the handshake with the peer.
    pub tcp_established: u64,
    /// TCP connections closed normally (both directions done).
    pub tcp_closed: u64,
    /// SYNs refused because of a connection limit.
    pub tcp_refused_limit: u64,
    /// Connects in progress abandoned to make room for a newer SYN of the
    /// same peer (`--max-tcp-pending-connects`).
    pub tcp_pending_evicted: u64,
    /// Non-SYN segments for no connection (answered with RST).
    pub tcp_stray_segments: u64,
    /// TCP segments dropped: outside the window, or not acceptable.
    pub tcp_segments_dropped: u64,
    /// RSTs sent to peers.
    pub tcp_resets_sent: u64,
    /// TCP segments sent again (timeouts and fast retransmits).
    pub tcp_retransmits: u64,
    /// Fast retransmits after duplicate ACKs.
    pub tcp_fast_retransmits: u64,
    /// TCP connections reset after too many retransmission timeouts.
    pub tcp_retransmit_timeouts: u64,
    /// TCP connections reset after their idle timeout.
    pub tcp_idle_closed: u64,
    /// Echo identities given a host ping socket.
    pub icmp_ids_opened: u64,
    /// Echo identities closed because the table was full.
    pub icmp_ids_evicted: u64,
    /// Echo replies from the network delivered to peers.
    pub echo_replies_forwarded: u64,
    /// Datagrams carried by reverse UDP forwards, into the tunnel.
    pub forward_datagrams_in: u64,
    /// Replies carried by reverse UDP forwards, back to host-side senders.
    pub forward_datagrams_out: u64,
    /// Datagrams on reverse UDP forwards that could not be carried.
    pub dropped_forward: u64,
    /// Connections accepted on reverse TCP forwards and opened toward the
    /// peer.
    pub tcp_forward_accepted: u64,
    /// Connections accepted on reverse TCP forwards and aborted at once: no
    /// tunnel-side source of DEST's IP version, or no free port.
    pub tcp_forward_dropped: u64,
    /// Reverse TCP connections that DEST refused (RST).
    pub tcp_forward_refused: u64,
    /// Reverse TCP connections that DEST did not answer within
    /// `--tcp-connect-timeout`.
    pub tcp_forward_timeouts: u64,
    /// ICMP errors about UDP datagrams relayed to peers.
    pub udp_errors_relayed: u64,
    /// Packets from peers to destinations the access policy denies.
    pub dropped_policy: u64,
    /// Fragments from peers dropped (malformed, overlapping, no room).
    pub dropped_fragments: u64,
    /// Datagrams from peers put back together from fragments.
    pub datagrams_reassembled: u64,
    /// Packets for peers split into fragments to fit the MTU.
    pub packets_fragmented: u64,
    /// Packets from a source address that no peer's allowed IPs hold (only
    /// possible with several peers, after a peer was removed, or without
    /// any).
    pub dropped_no_peer: u64,
    /// Flows closed because their peer was removed ([`Router::set_peers`]).
    pub peer_flows_closed: u64,
    /// Packets from peers (other than TCP, which gets RST) and reverse-forward
    /// datagrams dropped because the router is shutting down.
    pub dropped_shutdown: u64,
    /// Flows closed by [`Router::shut_down`] (TCP, UDP and ICMP).
    pub flows_closed_at_shutdown: u64,
}

impl Stats {
    /// Adds `other`'s counts to these: the totals of several routers (the
    /// shards of one gateway). Every field is named, so a new counter
    /// cannot be left out.
    pub fn add(&mut self, other: &Stats) {
        add_each_field!(
            self,
            other,
            Stats {
                packets_in,
                packets_out,
                dropped_malformed,
                dropped_unsupported,
                dropped_too_big,
                dropped_queue_full,
                echo_replies,
                udp_flows_opened,
                udp_flows_evicted,
                udp_flows_expired,
                dns_queries,
                dns_dropped,
                dns_errors,
                dns_resolved,
                dns_forwarded,
                dns_nxdomain,
                dns_servfail,
                dns_timeouts,
                dns_over_capacity,
                dns_truncated,
                tcp_connects,
                tcp_connect_failures,
                tcp_connect_timeouts,
                tcp_established,
                tcp_closed,
                tcp_refused_limit,
                tcp_pending_evicted,
                tcp_stray_segments,
                tcp_segments_dropped,
                tcp_resets_sent,
                tcp_retransmits,
                tcp_fast_retransmits,
                tcp_retransmit_timeouts,
                tcp_idle_closed,
                icmp_ids_opened,
                icmp_ids_evicted,
                echo_replies_forwarded,
                forward_datagrams_in,
                forward_datagrams_out,
                dropped_forward,
                tcp_forward_accepted,
                tcp_forward_dropped,
                tcp_forward_refused,
                tcp_forward_timeouts,
                udp_errors_relayed,
                dropped_policy,
                dropped_fragments,
                datagrams_reassembled,
                packets_fragmented,
                dropped_no_peer,
                peer_flows_closed,
                dropped_shutdown,
                flows_closed_at_shutdown
            }
        );
    }
}

/// How full the router's bounded tables are, from [`Router::occupancy`]: the
/// flow tables summed over every peer, and the shared tables. Each peer's
/// share stays within its limits in [`Config`] ([`PeerOccupancy`]), and the
/// shared tables within theirs, whatever the peers send
/// ([`Router::within_limits`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Occupancy {
    /// UDP flows (`--max-udp-flows` per peer).
    pub udp_flows: usize,
    /// TCP connections, TIME-WAIT included (`--max-tcp-connections` per
    /// peer).
    pub tcp_connections: usize,
    /// TCP connections waiting for their host connect
    /// (`--max-tcp-pending-connects` per peer).
    pub tcp_pending_connects: usize,
    /// ICMP echo identities (`--max-icmp-ids` per peer).
    pub icmp_ids: usize,
    /// DNS queries in flight (`--max-dns-queries` per peer).
    pub dns_queries: usize,
    /// Bytes held for reassembly, overheads included
    /// (`--max-reassembly-bytes`, shared).
    pub reassembly_bytes: usize,
    /// Packets waiting for the tunnel (`--transmit-queue-capacity`, shared).
    pub transmit_queue: usize,
}

impl Occupancy {
    /// Adds `other`'s figures to these, for the shards of one gateway.
    pub fn add(&mut self, other: &Occupancy) {
        add_each_field!(
            self,
            other,
            Occupancy {
                udp_flows,
                tcp_connections,
                tcp_pending_connects,
                icmp_ids,
                dns_queries,
                reassembly_bytes,
                transmit_queue
            }
        );
    }
}

/// How full one peer's share of the flow tables is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerOccupancy {
    /// UDP flows (`--max-udp-flows`).
    pub udp_flows: usize,
    /// TCP connections, TIME-WAIT included (`--max-tcp-connections`).
    pub tcp_connections: usize,
    /// TCP connections waiting for their host connect
    /// (`--max-tcp-pending-connects`).
    pub tcp_pending_connects: usize,
    /// ICMP echo identities (`--max-icmp-ids`).
    pub icmp_ids: usize,
    /// DNS queries in flight (`--max-dns-queries`).
    pub dns_queries: usize,
}

impl PeerOccupancy {
    /// Adds `other`'s figures to these, for the shards of one gateway.
    pub fn add(&mut self, other: &PeerOccupancy) {
        add_each_field!(
            self,
            other,
            PeerOccupancy {
                udp_flows,
                tcp_connections,
                tcp_pending_connects,
                icmp_ids,
                dns_queries
            }
        );
    }

    /// Whether every count is within its per-peer limit in `config`.
    pub fn within(&self, config: &Config) -> bool {
        self.udp_flows <= config.max_udp_flows
            && self.tcp_connections <= config.max_tcp_connections
            && self.tcp_pending_connects <= config.max_tcp_pending_connects
            && self.icmp_ids <= config.max_icmp_ids
            && self.dns_queries <= config.max_dns_queries
    }
}

/// One peer's figures, from [`Router::peer_stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's public key; `None` for the one peer of raw IP mode (or of
    /// a router made without a peer list).
    pub public_key: Option<Key>,
    /// Inner packets and bytes from and to the peer.
    pub counters: PeerCounters,
    /// The peer's flows now.
    pub occupancy: PeerOccupancy,
}

/// The getters, and the peer list, which decides who owns what.
impl Router {
    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Each peer's figures, in the order of the peer list: what it sent and
    /// received, and its flows now. For metrics; allocates.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.peers
            .list()
            .iter()
            .map(|peer| PeerStats {
                public_key: peer.public_key,
                counters: peer.counters,
                occupancy: self.peer_occupancy(peer.id),
            })
            .collect()
    }

    /// How full `owner`'s share of the flow tables is.
    pub(super) fn peer_occupancy(&self, owner: PeerId) -> PeerOccupancy {
        PeerOccupancy {
            udp_flows: self.udp.owned(owner),
            tcp_connections: self.tcp.owned(owner),
            tcp_pending_connects: self.tcp.pending_of(owner),
            icmp_ids: self.echo.owned(owner),
            dns_queries: self.dns.as_ref().map_or(0, |dns| dns.in_flight_of(owner)),
        }
    }

    /// Whether every table is within its limit in `config` (which should be
    /// the one the router was made with): each peer's flows within the
    /// per-peer limits, the shared tables within theirs, and no flow left
    /// to a peer that is gone. For tests and fuzzing.
    pub fn within_limits(&self, config: &Config) -> bool {
        let total = self.occupancy();
        let live: usize = self
            .peers
            .list()
            .iter()
            .map(|peer| {
                let o = self.peer_occupancy(peer.id);
                o.udp_flows + o.tcp_connections + o.icmp_ids + o.dns_queries
            })
            .sum();
        self.peers
            .list()
            .iter()
            .all(|peer| self.peer_occupancy(peer.id).within(config))
            && live == total.udp_flows + total.tcp_connections + total.icmp_ids + total.dns_queries
            && total.reassembly_bytes <= config.max_reassembly_bytes
            && total.transmit_queue <= config.transmit_queue_capacity
    }

    /// Replaces the peer list, for a configuration reload. Allowed IPs take
    /// effect at once for every packet. A peer whose public key was in the
    /// old list keeps its flows and counters; every flow of a peer that is
    /// gone is closed on the host side through the usual
    /// [`SocketAction`](super::SocketAction)s (nothing is sent toward the peer, which is no
    /// longer reachable), and counted in [`Stats::peer_flows_closed`].
    /// Drain [`Router::poll_socket_action`] afterwards.
    ///
    /// An empty list leaves no peer: every packet is then dropped.
    pub fn set_peers(&mut self, peers: &[PeerConfig]) {
        for gone in self.peers.replace(peers) {
            let mut closed = self.tcp.close_owner(gone, &mut self.actions);
            closed += self.udp.close_owner(gone, &mut self.actions);
            closed += self.echo.close_owner(gone, &mut self.actions);
            closed += self.reverse_udp.close_owner(gone);
            if let Some(dns) = self.dns.as_mut() {
                closed += dns.close_owner(gone, &mut self.actions);
            }
            tracing::debug!(peer = gone.0, closed, "peer removed: its flows closed");
            self.stats.peer_flows_closed += closed as u64;
        }
    }

    /// How full the bounded tables are now, summed over every peer.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            udp_flows: self.udp.len(),
            tcp_connections: self.tcp.len(),
            tcp_pending_connects: self.tcp.pending_connects(),
            icmp_ids: self.echo.len(),
            dns_queries: self.dns.as_ref().map_or(0, dns::DnsServer::in_flight),
            reassembly_bytes: self.reassembler.held_bytes(),
            transmit_queue: self.transmit.len(),
        }
    }

    /// Counts `packet`, on its way to the tunnel, for the peer that owns
    /// its destination, and returns that peer.
    pub(super) fn count_to_peer(&mut self, packet: &[u8]) -> Option<PeerId> {
        let index = peers::destination_of(packet).and_then(|dst| self.peers.lookup(dst));
        let peer = index.and_then(|index| self.peers.get_mut(index))?;
        peer.counters.packets_to += 1;
        peer.counters.bytes_to += packet.len() as u64;
        Some(peer.id)
    }
}
