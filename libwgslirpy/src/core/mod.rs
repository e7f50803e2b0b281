//! The sans-I/O router core.
//!
//! [`Router`] is a deterministic state machine. It never touches a socket
//! and never reads the clock: every input carries `now`, and every output is
//! a plain value that the driver carries out.
//!
//! ## Using it
//! Methods fall into groups:
//! - **inputs**, `handle_*`: a packet from a peer
//!   ([`Router::handle_packet`]), an event from a host socket
//!   ([`Router::handle_udp_datagram`], [`Router::handle_udp_failed`]), or a
//!   timer firing ([`Router::handle_timeout`]);
//! - **outputs**, `poll_*`: packets for peers ([`Router::poll_transmit`]),
//!   actions on host sockets ([`Router::poll_socket_action`]), and the next
//!   deadline ([`Router::poll_timeout`]);
//! - **getters**: [`Router::stats`].
//!
//! After each input, drain `poll_socket_action` and `poll_transmit` until
//! they return `None`, then re-arm the timer from `poll_timeout`. Each input
//! produces a bounded number of outputs, so draining after every input keeps
//! the queues short. Packets for peers are held in a queue bounded by the
//! transmit queue capacity; beyond it they are dropped and counted.
//!
//! ## What it handles
//! - ICMP/ICMPv6 echo: answered for the pingable addresses, forwarded
//!   through host ping sockets otherwise ([`icmp`]);
//! - UDP, through endpoint-independent NAT ([`udp`]);
//! - IP fragments: the peer's are reassembled, and packets for the peer
//!   over the MTU are fragmented ([`fragment`]);
//! - the access policy, asked before any new traffic leaves ([`policy`]);
//! - reverse UDP forwards from host ports into the tunnel ([`forward`]);
//! - everything else is counted and dropped.

pub mod flows;
pub mod forward;
pub mod fragment;
pub mod icmp;
pub mod packet;
pub mod policy;
pub mod udp;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

pub use flows::FlowId;

use crate::Config;
use packet::Parsed;

/// What the driver must do with host sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAction {
    /// Open a UDP socket for `flow`, bound to an ephemeral port on the
    /// unspecified address of the given family. If that fails, call
    /// [`Router::handle_udp_failed`].
    UdpOpen {
        /// The flow that owns the socket.
        flow: FlowId,
        /// IPv6 (true) or IPv4 socket.
        ipv6: bool,
    },
    /// Send `payload` from the socket of `flow` to `dest`, without waiting:
    /// if the socket cannot take it now, drop it.
    UdpSend {
        /// The flow whose socket sends.
        flow: FlowId,
        /// The remote address.
        dest: SocketAddr,
        /// The datagram.
        payload: Bytes,
    },
    /// Close the socket of `flow`.
    UdpClose {
        /// The flow whose socket closes.
        flow: FlowId,
    },
    /// Open an ICMP echo ("ping") socket for `flow`. If that fails, call
    /// [`Router::handle_icmp_failed`].
    IcmpOpen {
        /// The echo identity that owns the socket.
        flow: FlowId,
        /// ICMPv6 (true) or ICMP socket.
        ipv6: bool,
    },
    /// Send an echo request from the socket of `flow` to `dest`, without
    /// waiting. The socket supplies the identifier.
    IcmpSend {
        /// The echo identity whose socket sends.
        flow: FlowId,
        /// The address pinged.
        dest: IpAddr,
        /// The peer's sequence number.
        seq_no: u16,
        /// The echo payload.
        data: Bytes,
    },
    /// Close the ICMP socket of `flow`.
    IcmpClose {
        /// The echo identity whose socket closes.
        flow: FlowId,
    },
    /// Send `payload` out of the HOST socket of reverse UDP forward
    /// `forward` (its index in the `-u` list) to the host-side sender `to`,
    /// without waiting.
    ForwardUdpSend {
        /// The forward's index.
        forward: usize,
        /// The host-side sender.
        to: SocketAddr,
        /// The datagram.
        payload: Bytes,
    },
}

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
}

/// The router state machine. See the module documentation.
pub struct Router {
    mtu: usize,
    pingable: Vec<IpAddr>,
    udp: udp::UdpNat,
    echo: icmp::EchoNat,
    reverse_udp: forward::ReverseUdp,
    policy: policy::Policy,
    reassembler: fragment::Reassembler,
    /// Identification of the next packet fragmented toward a peer.
    next_fragment_ident: u32,
    transmit: VecDeque<BytesMut>,
    transmit_capacity: usize,
    actions: VecDeque<SocketAction>,
    stats: Stats,
}

impl Router {
    /// A router for `config`, which should have passed [`Config::validate`].
    pub fn new(config: &Config) -> Self {
        Router {
            mtu: usize::from(config.mtu),
            pingable: config.pingable.clone(),
            udp: udp::UdpNat::new(config.max_udp_flows, config.udp_idle_timeout),
            echo: icmp::EchoNat::new(config.max_icmp_ids, config.icmp_idle_timeout),
            reverse_udp: forward::ReverseUdp::new(
                config.incoming_udp.clone(),
                config.max_udp_flows,
                config.udp_idle_timeout,
            ),
            policy: policy::Policy::new(
                &[],
                config.allow.clone(),
                config.deny.clone(),
                config.host_address,
            ),
            reassembler: fragment::Reassembler::new(
                config.max_reassembly_bytes,
                config.reassembly_timeout,
            ),
            next_fragment_ident: 0,
            transmit: VecDeque::with_capacity(config.transmit_queue_capacity),
            transmit_capacity: config.transmit_queue_capacity,
            actions: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Tells the router the host's own interface addresses, which the access
    /// policy denies by default. Call it at startup, and again when they
    /// change.
    pub fn set_host_addresses(&mut self, addresses: &[IpAddr]) {
        self.policy.set_host_interfaces(addresses);
    }

    /// A plain IP packet from a peer.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) {
        self.stats.packets_in += 1;
        let reassembled;
        let packet = match self.reassembler.handle(now, packet) {
            fragment::Reassembly::NotFragment => packet,
            fragment::Reassembly::Pending => return,
            fragment::Reassembly::Complete(whole) => {
                self.stats.datagrams_reassembled += 1;
                reassembled = whole;
                &reassembled[..]
            }
            fragment::Reassembly::Dropped => {
                tracing::trace!(len = packet.len(), "dropped fragment from peer");
                self.stats.dropped_fragments += 1;
                return;
            }
        };
        let parsed = match packet::parse(packet) {
            Ok(parsed) => parsed,
            Err(packet::Drop::Malformed) => {
                tracing::trace!(len = packet.len(), "dropped malformed packet from peer");
                self.stats.dropped_malformed += 1;
                return;
            }
            Err(packet::Drop::Unsupported) => {
                tracing::trace!(len = packet.len(), "dropped unsupported packet from peer");
                self.stats.dropped_unsupported += 1;
                return;
            }
        };
        match parsed {
            Parsed::Udp { src, dst, payload } => {
                if let Some(reply) = self.reverse_udp.from_tunnel(now, src, dst) {
                    self.stats.forward_datagrams_out += 1;
                    self.actions.push_back(SocketAction::ForwardUdpSend {
                        forward: reply.forward,
                        to: reply.to,
                        payload: Bytes::copy_from_slice(payload),
                    });
                } else if self.permits(packet, dst.ip(), Some(dst.port())) {
                    let dst = SocketAddr::new(self.policy.map_destination(dst.ip()), dst.port());
                    self.udp
                        .outbound(now, src, dst, payload, &mut self.actions, &mut self.stats)
                }
            }
            Parsed::EchoRequest {
                src,
                dst,
                ident,
                seq_no,
                data,
            } => match icmp::answer_echo(&self.pingable, src, dst, ident, seq_no, data) {
                Some(reply) => {
                    self.stats.echo_replies += 1;
                    self.transmit(reply);
                }
                None if self.permits(packet, dst, None) => self.echo.outbound(
                    now,
                    src,
                    self.policy.map_destination(dst),
                    ident,
                    seq_no,
                    data,
                    &mut self.actions,
                    &mut self.stats,
                ),
                None => {}
            },
            Parsed::Other { protocol } => {
                tracing::trace!(protocol, "dropped packet of unhandled protocol");
                self.stats.dropped_unsupported += 1;
            }
        }
    }

    /// A datagram from `from` arrived on the socket of UDP `flow`.
    pub fn handle_udp_datagram(
        &mut self,
        now: Instant,
        flow: FlowId,
        from: SocketAddr,
        payload: &[u8],
    ) {
        let from_ip = self.policy.unmap_source(from.ip().to_canonical());
        let from = SocketAddr::new(from_ip, from.port());
        let Some(peer_side) = self.udp.inbound(now, flow, from) else {
            return;
        };
        match packet::build_udp(from, peer_side, payload) {
            Some(reply) => self.transmit(reply),
            None => self.stats.dropped_too_big += 1,
        }
    }

    /// A datagram from the host-side sender `from` arrived on the HOST socket
    /// of reverse UDP forward `forward`.
    pub fn handle_forward_datagram(
        &mut self,
        now: Instant,
        forward: usize,
        from: SocketAddr,
        payload: &[u8],
    ) {
        let packet = self
            .reverse_udp
            .from_host(now, forward, from)
            .and_then(|out| packet::build_udp(out.source, out.dest, payload));
        match packet {
            Some(packet) => {
                self.stats.forward_datagrams_in += 1;
                self.transmit(packet);
            }
            None => {
                tracing::debug!(forward, %from, "reverse UDP datagram dropped");
                self.stats.dropped_forward += 1;
            }
        }
    }

    /// A datagram sent from the socket of UDP `flow` to `dest` drew the ICMP
    /// error `why`: the peer gets the matching ICMP error, as if from `dest`.
    pub fn handle_udp_unreachable(
        &mut self,
        now: Instant,
        flow: FlowId,
        dest: SocketAddr,
        why: packet::IcmpError,
    ) {
        let dest_ip = self.policy.unmap_source(dest.ip().to_canonical());
        let dest = SocketAddr::new(dest_ip, dest.port());
        let Some(peer_side) = self.udp.inbound(now, flow, dest) else {
            return;
        };
        // The error quotes a stand-in for the peer's datagram: the peer
        // matches errors by addresses and ports, which it has.
        let error = packet::build_udp(peer_side, dest, &[])
            .and_then(|original| packet::build_icmp_error(&original, why));
        if let Some(error) = error {
            self.stats.udp_errors_relayed += 1;
            self.transmit(error);
        }
    }

    /// The socket of UDP `flow` could not be opened or has failed; the
    /// driver has dropped it.
    pub fn handle_udp_failed(&mut self, _now: Instant, flow: FlowId) {
        self.udp.remove(flow);
    }

    /// An echo reply from `from` arrived on the ICMP socket of `flow`.
    pub fn handle_echo_reply(
        &mut self,
        now: Instant,
        flow: FlowId,
        from: IpAddr,
        seq_no: u16,
        data: &[u8],
    ) {
        let from = self.policy.unmap_source(from.to_canonical());
        let Some((peer, ident)) = self.echo.inbound(now, flow, from) else {
            return;
        };
        if let Some(reply) = packet::build_echo_reply(from, peer, ident, seq_no, data) {
            self.stats.echo_replies_forwarded += 1;
            self.transmit(reply);
        }
    }

    /// The ICMP socket of `flow` could not be opened or has failed; the
    /// driver has dropped it.
    pub fn handle_icmp_failed(&mut self, _now: Instant, flow: FlowId) {
        self.echo.remove(flow);
    }

    /// The deadline from [`Router::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.udp.expire(now, &mut self.actions, &mut self.stats);
        self.echo.expire(now, &mut self.actions);
        self.reverse_udp.expire(now);
        self.reassembler.expire(now);
    }

    /// The next packet for a peer.
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        self.transmit.pop_front()
    }

    /// The next action on a host socket.
    pub fn poll_socket_action(&mut self) -> Option<SocketAction> {
        self.actions.pop_front()
    }

    /// When [`Router::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.udp.next_expiry(),
            self.echo.next_expiry(),
            self.reverse_udp.next_expiry(),
            self.reassembler.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the access policy lets `packet` reach `dst`; if not, the peer
    /// gets an "administratively prohibited" ICMP error.
    fn permits(&mut self, packet: &[u8], dst: IpAddr, port: Option<u16>) -> bool {
        let Err(denial) = self.policy.check(dst, port) else {
            return true;
        };
        tracing::debug!(%dst, ?port, ?denial, "denied by the access policy");
        self.stats.dropped_policy += 1;
        if let Some(error) = packet::build_icmp_error(packet, packet::IcmpError::AdminProhibited) {
            self.transmit(error);
        }
        false
    }

    /// Queues `packet` for the peer, in fragments if it exceeds the MTU. A
    /// packet whose fragments do not all fit the queue is dropped whole.
    fn transmit(&mut self, packet: BytesMut) {
        if packet.len() <= self.mtu {
            if self.transmit.len() >= self.transmit_capacity {
                self.stats.dropped_queue_full += 1;
            } else {
                self.stats.packets_out += 1;
                self.transmit.push_back(packet);
            }
            return;
        }
        let mut pieces = Vec::new();
        let ident = self.next_fragment_ident;
        self.next_fragment_ident = self.next_fragment_ident.wrapping_add(1);
        if !fragment::fragment(&packet, self.mtu, ident, |piece| pieces.push(piece)) {
            self.stats.dropped_too_big += 1;
        } else if self.transmit.len() + pieces.len() > self.transmit_capacity {
            self.stats.dropped_queue_full += 1;
        } else {
            self.stats.packets_fragmented += 1;
            self.stats.packets_out += pieces.len() as u64;
            self.transmit.extend(pieces);
        }
    }
}

#[cfg(test)]
mod tests;
