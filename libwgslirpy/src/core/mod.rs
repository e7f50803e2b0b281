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
//!   ([`Router::handle_udp_datagram`], [`Router::handle_udp_failed`],
//!   [`Router::handle_tcp_accepted`], ...), the
//!   result of a DNS lookup ([`Router::handle_dns_result`]), or a timer
//!   firing ([`Router::handle_timeout`]);
//! - **outputs**, `poll_*`: packets for peers ([`Router::poll_transmit`]),
//!   actions on host sockets ([`Router::poll_socket_action`]), and the next
//!   deadline ([`Router::poll_timeout`]);
//! - **getters**: [`Router::stats`], [`Router::occupancy`],
//!   [`Router::peer_stats`], [`Router::within_limits`];
//! - **commands**: [`Router::set_peers`], [`Router::set_host_addresses`],
//!   and [`Router::shut_down`], which closes every flow toward both sides
//!   and refuses new ones, for a graceful stop.
//!
//! After each input, drain `poll_socket_action` until it returns `None`,
//! take packets from `poll_transmit` while the tunnel has room for them
//! ([`Router::has_transmit`] says whether more are waiting: TCP segments are
//! made only when asked for, so TCP is paced by the tunnel), then re-arm the
//! timer from `poll_timeout`. Each input produces a bounded number of
//! outputs. Packets for peers wait in a queue bounded by the transmit queue
//! capacity; beyond it they are dropped and counted.
//!
//! ## What it handles
//! - ICMP/ICMPv6 echo: answered for the pingable addresses, forwarded
//!   through host ping sockets otherwise ([`icmp`]);
//! - UDP and TCP to the `-D` address and port: the DNS server ([`dns`],
//!   [`dns_tcp`]);
//! - TCP, terminated here and relayed over host sockets ([`tcp`]);
//! - UDP, through endpoint-independent NAT ([`udp`]);
//! - IP fragments: the peer's are reassembled, and packets for the peer
//!   over the MTU are fragmented ([`fragment`]);
//! - the access policy, asked before any new traffic leaves ([`policy`]);
//! - reverse UDP and TCP forwards from host ports into the tunnel
//!   ([`forward`], [`tcp`]);
//! - everything else is counted and dropped.
//!
//! ## Peers
//! Every packet from the tunnel belongs to the peer whose allowed IPs hold
//! its source address by the longest prefix ([`peers`]), and every flow it
//! opens (TCP connection, UDP flow, echo identity, DNS query) belongs to
//! that peer; a reverse forward's flows belong to the peer that owns DEST.
//! The limits in [`Config`] apply to each peer on its own, so one peer's
//! flood can neither evict nor refuse another peer's flows
//! ([`flows`], [`stats`]).

/// Adds every field of `$other` to the same field of `$self`. The fields
/// are named in a destructuring pattern without `..`, so a field added to
/// the type and not here is a compile error, not a count left out.
macro_rules! add_each_field {
    ($self:ident, $other:ident, $type:ident { $($field:ident),* $(,)? }) => {
        let $type { $($field),* } = *$other;
        $($self.$field += $field;)*
    };
}

pub mod dns;
pub mod dns_tcp;
pub mod flows;
pub mod forward;
pub mod fragment;
pub mod icmp;
pub mod limit;
pub mod packet;
pub mod peers;
pub mod policy;
pub mod shard;
pub mod stats;
pub mod tcp;
pub mod udp;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

pub use dns::{DnsOutcome, DnsQueryId};
pub use flows::FlowId;
pub use peers::{PeerCounters, PeerId};
pub use stats::{Occupancy, PeerOccupancy, PeerStats, Stats};
pub use tcp::ConnectError;

use crate::Config;
use crate::config::Transport;
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
    /// Open a TCP socket for `flow` and connect it to `dest` without
    /// blocking; report with [`Router::handle_tcp_connected`] or
    /// [`Router::handle_tcp_connect_failed`] (also when no socket can be
    /// made). Read nothing before a [`SocketAction::TcpRead`].
    TcpConnect {
        /// The flow that owns the socket.
        flow: FlowId,
        /// The destination the peer asked for.
        dest: SocketAddr,
    },
    /// Write `data` to the socket of `flow`, after every earlier write:
    /// what the socket does not take at once waits in the flow's pending
    /// buffer. Report progress with [`Router::handle_tcp_written`]. The
    /// core never has more than `--tcp-buffer-size` bytes unwritten.
    TcpWrite {
        /// The flow whose socket writes.
        flow: FlowId,
        /// The bytes, in stream order.
        data: Bytes,
    },
    /// The socket of `flow` may deliver `max` more bytes (added to what was
    /// granted before) through [`Router::handle_tcp_data`]. Without credit,
    /// do not read: the host's sender then blocks.
    TcpRead {
        /// The flow whose socket may read.
        flow: FlowId,
        /// Bytes added to the flow's credit.
        max: usize,
    },
    /// `shutdown(Write)` the socket of `flow`. Issued only after every
    /// [`SocketAction::TcpWrite`] was reported written.
    TcpShutdownWrite {
        /// The flow whose socket half-closes.
        flow: FlowId,
    },
    /// Close the socket of `flow` (both directions are done, or a connect
    /// is abandoned). Ignore unknown flows.
    TcpClose {
        /// The flow whose socket closes.
        flow: FlowId,
    },
    /// Abort the socket of `flow`: close it with `SO_LINGER` 0, so the host
    /// side sees a RST. Ignore unknown flows.
    TcpAbort {
        /// The flow whose socket is reset.
        flow: FlowId,
    },
    /// Look `name` up with the host's resolver (getaddrinfo, both address
    /// families at once), without blocking the caller, and report with
    /// [`Router::handle_dns_result`]: [`DnsOutcome::Addresses`],
    /// [`DnsOutcome::NoSuchName`] or [`DnsOutcome::Failed`].
    DnsResolve {
        /// The query waiting for it.
        query: DnsQueryId,
        /// The name, dotted, without a trailing dot.
        name: String,
    },
    /// Send the DNS query `message` to the host's nameservers and report
    /// the first answer with [`Router::handle_dns_result`]:
    /// [`DnsOutcome::Upstream`], [`DnsOutcome::NoNameserver`] or
    /// [`DnsOutcome::Failed`].
    DnsForward {
        /// The query waiting for it.
        query: DnsQueryId,
        /// The query as the peer sent it.
        message: Bytes,
    },
    /// Stop working on `query`: it has been answered (timed out). Its
    /// result, if it still comes, is ignored.
    DnsCancel {
        /// The query given up on.
        query: DnsQueryId,
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

/// The router state machine. See the module documentation.
pub struct Router {
    mtu: usize,
    pingable: Vec<IpAddr>,
    udp: udp::UdpNat,
    dns: Option<dns::DnsServer>,
    dns_tcp: dns_tcp::DnsTcp,
    echo: icmp::EchoNat,
    reverse_udp: forward::ReverseUdp,
    reverse_tcp: forward::ReverseTcp,
    policy: policy::Policy,
    reassembler: fragment::Reassembler,
    /// Identification of the next packet fragmented toward a peer.
    next_fragment_ident: u32,
    transmit: VecDeque<BytesMut>,
    transmit_capacity: usize,
    actions: VecDeque<SocketAction>,
    tcp: tcp::Tcp,
    peers: peers::Peers,
    /// The newest `now` any input brought, for lazily made TCP segments.
    now: Option<Instant>,
    /// [`Router::shut_down`] was called: no new flows.
    shutting_down: bool,
    stats: Stats,
    /// This router's index among the gateway's shards, and how many there
    /// are ([`shard`]).
    shard: usize,
    shards: shard::Shards,
    /// Reassembled datagrams that another shard owns, with its index,
    /// waiting for [`Router::poll_reroute`]; bounded by the transmit
    /// queue's capacity.
    rerouted: VecDeque<(usize, BytesMut)>,
}

impl Router {
    /// A router for `config`, which should have passed [`Config::validate`].
    ///
    /// The secret that keys TCP initial sequence numbers (RFC 6528) is drawn
    /// from the OS's random source; [`Router::with_secret`] takes it instead.
    pub fn new(config: &Config) -> Self {
        Self::with_secret(config, rand::random())
    }

    /// A router whose TCP initial sequence numbers are keyed by `secret`:
    /// deterministic for tests.
    pub fn with_secret(config: &Config, secret: [u8; 16]) -> Self {
        Router {
            mtu: usize::from(config.mtu),
            pingable: config.pingable.clone(),
            udp: udp::UdpNat::new(config.max_udp_flows, config.udp_idle_timeout),
            dns: config
                .dns
                .map(|addr| dns::DnsServer::new(addr, config.dns_timeout, config.max_dns_queries)),
            dns_tcp: dns_tcp::DnsTcp::default(),
            echo: icmp::EchoNat::new(config.max_icmp_ids, config.icmp_idle_timeout),
            reverse_udp: forward::ReverseUdp::new(
                config.incoming_udp.clone(),
                config.max_udp_flows,
                config.udp_idle_timeout,
            ),
            reverse_tcp: forward::ReverseTcp::new(config.incoming_tcp.clone()),
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
            tcp: tcp::Tcp::new(config, secret),
            peers: match &config.transport {
                Transport::WireGuard { peers, .. } => peers::Peers::new(peers),
                Transport::RawIp { .. } => peers::Peers::single(),
            },
            now: None,
            shutting_down: false,
            stats: Stats::default(),
            shard: 0,
            shards: shard::Shards::default(),
            rerouted: VecDeque::new(),
        }
    }

    /// Makes this router shard `index` of `shards`: it then hands each
    /// datagram it reassembles but does not own to that datagram's shard
    /// ([`Router::poll_reroute`]). Make it with
    /// [`Shards::config_for_each`](shard::Shards::config_for_each).
    pub fn in_shard(mut self, index: usize, shards: shard::Shards) -> Self {
        self.shard = index;
        self.shards = shards;
        self
    }

    /// Whether [`Router::shut_down`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Closes everything, toward both sides, and refuses new flows from now
    /// on: the gateway is stopping.
    ///
    /// - TCP: each connection is reset toward the peer (RST) and its host
    ///   socket aborted ([`SocketAction::TcpAbort`], so the host side sees a
    ///   RST too). RST rather than FIN because a FIN needs the peer's ACK,
    ///   and the host's FIN would tell its program that the stream is
    ///   complete when it was cut.
    /// - UDP flows and ICMP echo identities: their sockets are closed.
    /// - DNS queries in flight: cancelled, unanswered.
    /// - Afterwards a SYN from a peer gets RST, other segments of no
    ///   connection get RST as usual, everything else from peers is dropped
    ///   and counted in [`Stats::dropped_shutdown`], and
    ///   [`Router::handle_tcp_accepted`] refuses.
    ///
    /// Then drain [`Router::poll_socket_action`] and
    /// [`Router::poll_transmit`] as after any input; the RSTs wait in the
    /// transmit queue like any packet.
    pub fn shut_down(&mut self, now: Instant) {
        self.now = Some(now);
        self.shutting_down = true;
        let before = self.tcp.len() + self.udp.len() + self.echo.len();
        self.tcp.shut_down(&mut self.actions, &mut self.stats);
        self.flush_tcp();
        self.udp.close_all(&mut self.actions);
        self.echo.close_all(&mut self.actions);
        if let Some(dns) = self.dns.as_mut() {
            dns.cancel_all(&mut self.actions);
        }
        self.stats.flows_closed_at_shutdown += before as u64;
        tracing::debug!(flows = before, "router shut down: every flow closed");
    }

    /// Tells the router the host's own interface addresses, which the access
    /// policy denies by default. Call it at startup, and again when they
    /// change.
    pub fn set_host_addresses(&mut self, addresses: &[IpAddr]) {
        self.policy.set_host_interfaces(addresses);
    }

    /// A plain IP packet from a peer.
    ///
    /// The packet belongs to the peer whose allowed IPs hold its source
    /// address (the transport has checked that the sender may use it); a
    /// source that no peer holds is dropped and counted. Payloads passed on
    /// to host sockets are copied out of `packet`; see
    /// [`Router::handle_owned_packet`] for the way without copies.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) {
        self.receive(now, packet, None);
    }

    /// [`Router::handle_packet`] for a packet handed over: the TCP and UDP
    /// payloads passed on to host sockets ([`SocketAction::TcpWrite`],
    /// [`SocketAction::UdpSend`]) are views of it, not copies. The driver
    /// uses this one.
    pub fn handle_owned_packet(&mut self, now: Instant, packet: Bytes) {
        self.receive(now, &packet, Some(&packet));
    }

    /// A packet from a peer; `owned` is the same bytes when the router may
    /// keep views of them.
    fn receive(&mut self, now: Instant, packet: &[u8], owned: Option<&Bytes>) {
        self.now = Some(now);
        self.stats.packets_in += 1;
        // A packet too short for a source address goes on to be dropped as
        // malformed.
        let mut owner = None;
        let mut peer_index = None;
        if let Some(src) = peers::source_of(packet) {
            let Some(index) = self.peers.lookup(src) else {
                tracing::trace!(%src, "dropped packet from an address of no peer");
                self.stats.dropped_no_peer += 1;
                return;
            };
            if let Some(peer) = self.peers.get_mut(index) {
                peer.counters.packets_from += 1;
                peer.counters.bytes_from += packet.len() as u64;
                owner = Some(peer.id);
                peer_index = Some(index);
            }
        }
        let reassembled;
        let (packet, owned) = match self.reassembler.handle(now, packet) {
            fragment::Reassembly::NotFragment => (packet, owned),
            fragment::Reassembly::Pending => return,
            fragment::Reassembly::Complete(whole) => {
                self.stats.datagrams_reassembled += 1;
                let shard = self.shards.of_packet(&whole);
                if shard != self.shard {
                    self.reroute(shard, whole, peer_index);
                    return;
                }
                reassembled = whole;
                (&reassembled[..], None)
            }
            fragment::Reassembly::Dropped => {
                tracing::trace!(len = packet.len(), "dropped fragment from peer");
                self.stats.dropped_fragments += 1;
                return;
            }
        };
        let parsed = match packet::parse(packet) {
            Ok(_) if owner.is_none() => {
                self.stats.dropped_no_peer += 1;
                return;
            }
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
        let Some(owner) = owner else {
            return;
        };
        if self.shutting_down && !matches!(parsed, Parsed::Tcp { .. }) {
            self.stats.dropped_shutdown += 1;
            return;
        }
        match parsed {
            Parsed::Udp { src, dst, payload }
                if self.dns.as_ref().is_some_and(|dns| dns.addr() == dst) =>
            {
                self.dns_query(now, owner, src, dst, payload)
            }
            Parsed::Udp { src, dst, payload } => {
                if let Some(reply) = self.reverse_udp.from_tunnel(now, src, dst) {
                    self.stats.forward_datagrams_out += 1;
                    self.actions.push_back(SocketAction::ForwardUdpSend {
                        forward: reply.forward,
                        to: reply.to,
                        payload: packet::share(owned, payload),
                    });
                } else if self.permits(packet, dst.ip(), Some(dst.port())) {
                    let dst = SocketAddr::new(self.policy.map_destination(dst.ip()), dst.port());
                    self.udp.outbound(
                        now,
                        owner,
                        src,
                        dst,
                        packet::share(owned, payload),
                        &mut self.actions,
                        &mut self.stats,
                    )
                }
            }
            Parsed::Tcp {
                src,
                dst,
                mut segment,
            } => {
                segment.packet = owned;
                // Only a SYN can open a connection, so only a SYN asks the
                // policy; the DNS server's own address is always open.
                let to_dns = self.dns.as_ref().is_some_and(|dns| dns.addr() == dst);
                let connect_to = if self.shutting_down {
                    None
                } else if segment.syn && segment.ack.is_none() && !to_dns {
                    self.policy_admits(dst.ip(), Some(dst.port()))
                        .then(|| SocketAddr::new(self.policy.map_destination(dst.ip()), dst.port()))
                } else {
                    Some(dst)
                };
                self.tcp.segment(
                    now,
                    owner,
                    src,
                    dst,
                    connect_to,
                    &segment,
                    &mut self.actions,
                    &mut self.stats,
                );
                self.flush_tcp();
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
                    owner,
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
        if self.shutting_down {
            self.stats.dropped_shutdown += 1;
            return;
        }
        let peers = &self.peers;
        let packet = self
            .reverse_udp
            .from_host(now, forward, from, |dest| peers.owner(dest))
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

    /// The driver's result for DNS `query`, asked for with
    /// [`SocketAction::DnsResolve`] or [`SocketAction::DnsForward`]. A result
    /// for a query that has timed out is ignored.
    pub fn handle_dns_result(&mut self, now: Instant, query: DnsQueryId, outcome: DnsOutcome) {
        self.now = Some(now);
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        if let Some(answer) = dns.complete(query, outcome, &mut self.stats) {
            let server = dns.addr();
            self.transmit_dns(server, answer);
        }
    }

    /// The driver accepted a connection from the host-side client `client`
    /// on the HOST socket of reverse TCP forward `forward` (its index in
    /// the `-t` list). Returns the flow that now owns the socket: the
    /// router opens a connection to DEST inside the tunnel and grants read
    /// credit once it is established (nothing is read before). `None`
    /// means refused (a connection limit, no usable source address, or no
    /// peer owns DEST):
    /// abort the socket, so that the client sees a RST.
    #[must_use]
    pub fn handle_tcp_accepted(
        &mut self,
        now: Instant,
        forward: usize,
        client: SocketAddr,
    ) -> Option<FlowId> {
        self.now = Some(now);
        if self.shutting_down {
            self.stats.tcp_forward_dropped += 1;
            return None;
        }
        let tcp = &self.tcp;
        let Some(out) = self
            .reverse_tcp
            .endpoints(forward, client, |source, dest| tcp.in_use(dest, source))
        else {
            tracing::debug!(forward, %client, "reverse TCP connection refused: no source address");
            self.stats.tcp_forward_dropped += 1;
            return None;
        };
        let Some(owner) = self.peers.owner(out.dest.ip()) else {
            tracing::debug!(forward, %client, dest = %out.dest, "reverse TCP connection refused: DEST belongs to no peer");
            self.stats.tcp_forward_dropped += 1;
            return None;
        };
        let flow = self
            .tcp
            .active_open(now, owner, out.dest, out.source, &mut self.stats);
        self.flush_tcp();
        flow
    }

    /// The host connect of TCP `flow` succeeded.
    pub fn handle_tcp_connected(&mut self, now: Instant, flow: FlowId) {
        self.now = Some(now);
        self.tcp
            .connected(now, flow, &mut self.actions, &mut self.stats);
        self.flush_tcp();
    }

    /// The host connect of TCP `flow` failed, or no socket could be made;
    /// the driver has dropped the socket.
    pub fn handle_tcp_connect_failed(&mut self, now: Instant, flow: FlowId, error: ConnectError) {
        self.now = Some(now);
        self.tcp.connect_failed(flow, error, &mut self.stats);
        self.flush_tcp();
    }

    /// Bytes read from the socket of TCP `flow`, within the credit that
    /// [`SocketAction::TcpRead`] granted. [`Router::handle_tcp_read`] reads
    /// them without this copy.
    pub fn handle_tcp_data(&mut self, now: Instant, flow: FlowId, data: &[u8]) {
        self.now = Some(now);
        self.tcp
            .data(now, flow, data, &mut self.actions, &mut self.stats);
        self.flush_tcp();
    }

    /// Reads from the socket of TCP `flow` straight into the connection's
    /// send buffer: `read` gets the buffer's free room, within the credit
    /// that [`SocketAction::TcpRead`] granted, at most `max` bytes and at
    /// least one, and fills what it can from its start. Returns what `read`
    /// returned, or `None` without calling it if the connection takes no
    /// bytes now (it has no credit left, or no longer reads).
    pub fn handle_tcp_read<R>(
        &mut self,
        now: Instant,
        flow: FlowId,
        max: usize,
        read: impl FnOnce(&mut dyn BufMut) -> R,
    ) -> Option<R> {
        self.now = Some(now);
        let outcome = self
            .tcp
            .read(now, flow, max, read, &mut self.actions, &mut self.stats);
        self.flush_tcp();
        outcome
    }

    /// The socket of TCP `flow` reached end of stream (the host side shut
    /// down its writing).
    pub fn handle_tcp_eof(&mut self, now: Instant, flow: FlowId) {
        self.now = Some(now);
        self.tcp.eof(now, flow, &mut self.actions, &mut self.stats);
        self.flush_tcp();
    }

    /// The socket of TCP `flow` took `n` more bytes of the
    /// [`SocketAction::TcpWrite`]s.
    pub fn handle_tcp_written(&mut self, now: Instant, flow: FlowId, n: usize) {
        self.now = Some(now);
        self.tcp
            .written(now, flow, n, &mut self.actions, &mut self.stats);
        self.flush_tcp();
    }

    /// The socket of TCP `flow` failed or was reset by the host side; the
    /// driver has dropped it. The peer gets a RST.
    pub fn handle_tcp_error(&mut self, now: Instant, flow: FlowId) {
        self.now = Some(now);
        self.tcp
            .host_error(flow, &mut self.actions, &mut self.stats);
        self.flush_tcp();
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
        self.now = Some(now);
        self.tcp.expire(now, &mut self.actions, &mut self.stats);
        self.flush_tcp();
        self.udp.expire(now, &mut self.actions, &mut self.stats);
        if let Some(dns) = self.dns.as_mut() {
            let mut answers = Vec::new();
            dns.expire(now, &mut self.actions, &mut self.stats, |answer| {
                answers.push(answer)
            });
            let server = dns.addr();
            for answer in answers {
                self.transmit_dns(server, answer);
            }
        }
        self.echo.expire(now, &mut self.actions);
        self.reverse_udp.expire(now);
        self.reassembler.expire(now);
    }

    /// The next packet for a peer.
    ///
    /// Queued packets come first; then TCP data segments, which are made
    /// here, one per call, round-robin over the connections that have
    /// something to send. So call this only when the tunnel has room: TCP
    /// then sends exactly as fast as the tunnel takes packets.
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        self.poll_transmit_to_peer().map(|(packet, _)| packet)
    }

    /// [`Router::poll_transmit`], with the peer the packet goes to (`None`
    /// if no peer's allowed IPs hold its destination any more), for a
    /// driver that spreads the peers over several encryption lanes.
    pub fn poll_transmit_to_peer(&mut self) -> Option<(BytesMut, Option<PeerId>)> {
        if let Some(packet) = self.transmit.pop_front() {
            let peer = self.count_to_peer(&packet);
            return Some((packet, peer));
        }
        let now = self.now?;
        let packet = self
            .tcp
            .poll_segment(now, &mut self.actions, &mut self.stats)?;
        self.stats.packets_out += 1;
        let peer = self.count_to_peer(&packet);
        Some((packet, peer))
    }

    /// Whether [`Router::poll_transmit`] may return a packet. When it is
    /// true, `poll_transmit` either returns one or makes it false.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty() || self.tcp.has_ready()
    }

    /// How many more packets the transmit queue takes before it drops. A
    /// driver reading datagrams for the peer can stop there and leave the
    /// rest in its sockets' buffers.
    pub fn transmit_room(&self) -> usize {
        self.transmit_capacity.saturating_sub(self.transmit.len())
    }

    /// A reassembled datagram that another shard owns, with that shard's
    /// index: hand it to that shard as a packet from the tunnel. Take one
    /// only when that shard's channel has room ([`Router::reroute_target`]
    /// says which shard the next is for); what waits here is bounded, and a
    /// datagram beyond that is dropped and counted in
    /// [`Stats::dropped_fragments`].
    pub fn poll_reroute(&mut self) -> Option<(usize, BytesMut)> {
        self.rerouted.pop_front()
    }

    /// The shard that the next datagram of [`Router::poll_reroute`] is for.
    pub fn reroute_target(&self) -> Option<usize> {
        self.rerouted.front().map(|&(shard, _)| shard)
    }

    /// Queues `whole`, reassembled here, for `shard`, which counts it as a
    /// packet from its peer when it arrives; so the count of it here (one
    /// more packet than its fragments) is taken back, and the totals over
    /// every shard stay exact.
    fn reroute(&mut self, shard: usize, whole: BytesMut, peer_index: Option<usize>) {
        if self.rerouted.len() >= self.transmit_capacity {
            self.stats.dropped_fragments += 1;
            return;
        }
        self.stats.packets_in = self.stats.packets_in.saturating_sub(1);
        if let Some(peer) = peer_index.and_then(|index| self.peers.get_mut(index)) {
            peer.counters.packets_from = peer.counters.packets_from.saturating_sub(1);
            peer.counters.bytes_from = peer.counters.bytes_from.saturating_sub(whole.len() as u64);
        }
        tracing::trace!(
            shard,
            len = whole.len(),
            "reassembled datagram handed to its shard"
        );
        self.rerouted.push_back((shard, whole));
    }

    /// The next action on a host socket.
    pub fn poll_socket_action(&mut self) -> Option<SocketAction> {
        while let Some(action) = self.actions.pop_front() {
            if let Some(action) = self.serve_locally(action) {
                return Some(action);
            }
        }
        None
    }

    /// Carries out the TCP actions of DNS-over-TCP connections here, since
    /// their "socket" is the router's own DNS server ([`dns_tcp`]). Returns
    /// every other action, for the driver.
    fn serve_locally(&mut self, action: SocketAction) -> Option<SocketAction> {
        let Some(now) = self.now else {
            return Some(action);
        };
        match action {
            SocketAction::TcpConnect { flow, dest }
                if self.dns.as_ref().is_some_and(|dns| dns.addr() == dest) =>
            {
                self.dns_tcp.open(flow);
                self.handle_tcp_connected(now, flow);
            }
            SocketAction::TcpWrite { flow, data } if self.dns_tcp.serves(flow) => {
                self.dns_tcp.input(flow, &data);
                self.pump_dns_tcp(now, flow);
            }
            SocketAction::TcpRead { flow, max } if self.dns_tcp.serves(flow) => {
                self.dns_tcp.credit(flow, max);
                self.pump_dns_tcp(now, flow);
            }
            SocketAction::TcpShutdownWrite { flow } if self.dns_tcp.serves(flow) => {
                self.dns_tcp.peer_done(flow);
                self.pump_dns_tcp(now, flow);
            }
            SocketAction::TcpClose { flow } | SocketAction::TcpAbort { flow }
                if self.dns_tcp.serves(flow) =>
            {
                self.dns_tcp.close(flow);
            }
            other => return Some(other),
        }
        None
    }

    /// Moves a DNS-over-TCP connection on: queries to the DNS server,
    /// answers to the peer as far as TCP's credit goes, and our FIN once
    /// everything is answered after the peer's.
    fn pump_dns_tcp(&mut self, now: Instant, flow: FlowId) {
        let client = dns::DnsClient::Tcp { flow };
        loop {
            let step = self.dns_tcp.step(flow);
            if step.consumed == 0 && step.data.is_empty() {
                break;
            }
            for query in &step.queries {
                let (Some(dns), Some(owner)) = (self.dns.as_mut(), self.tcp.owner(flow)) else {
                    return;
                };
                let answer = dns.query(
                    now,
                    owner,
                    client,
                    query,
                    usize::from(u16::MAX),
                    &mut self.actions,
                    &mut self.stats,
                );
                if let Some(message) = answer {
                    self.dns_tcp.answer(flow, &message);
                }
            }
            if step.consumed > 0 {
                self.handle_tcp_written(now, flow, step.consumed);
            }
            if !step.data.is_empty() {
                self.handle_tcp_data(now, flow, &step.data);
            }
        }
        let waiting = self
            .dns
            .as_ref()
            .is_some_and(|dns| dns.is_waiting_for(client));
        if self.dns_tcp.should_close(flow, waiting) {
            self.handle_tcp_eof(now, flow);
        }
    }

    /// When [`Router::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let dns = self.dns.as_ref().and_then(dns::DnsServer::next_deadline);
        [
            self.udp.next_expiry(),
            dns,
            self.tcp.next_deadline(),
            self.echo.next_expiry(),
            self.reverse_udp.next_expiry(),
            self.reassembler.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A UDP datagram from `src` to the DNS server at `dst`.
    fn dns_query(
        &mut self,
        now: Instant,
        owner: PeerId,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let transport_max = self
            .mtu
            .saturating_sub(packet::udp_packet_len(dst.is_ipv6(), 0));
        let client = dns::DnsClient::Udp { peer: src };
        if let Some(message) = dns.query(
            now,
            owner,
            client,
            payload,
            transport_max,
            &mut self.actions,
            &mut self.stats,
        ) {
            self.transmit_dns(dst, dns::DnsAnswer { client, message });
        }
    }

    /// Sends a DNS answer from the server at `server` to its client.
    fn transmit_dns(&mut self, server: SocketAddr, answer: dns::DnsAnswer) {
        match answer.client {
            dns::DnsClient::Udp { peer } => {
                if let Some(reply) = packet::build_udp(server, peer, &answer.message) {
                    self.transmit(reply);
                }
            }
            dns::DnsClient::Tcp { flow } => {
                self.dns_tcp.answer(flow, &answer.message);
                if let Some(now) = self.now {
                    self.pump_dns_tcp(now, flow);
                }
            }
        }
    }

    /// Moves the packets TCP made while handling an input to the queue.
    fn flush_tcp(&mut self) {
        while let Some(packet) = self.tcp.pop_packet() {
            self.transmit(packet);
        }
    }

    /// Whether the access policy lets a peer reach `dst`; a denial is
    /// counted and logged.
    fn policy_admits(&mut self, dst: IpAddr, port: Option<u16>) -> bool {
        let Err(denial) = self.policy.check(dst, port) else {
            return true;
        };
        tracing::debug!(%dst, ?port, ?denial, "denied by the access policy");
        self.stats.dropped_policy += 1;
        false
    }

    /// Whether the access policy lets `packet` reach `dst`; if not, the peer
    /// gets an "administratively prohibited" ICMP error.
    fn permits(&mut self, packet: &[u8], dst: IpAddr, port: Option<u16>) -> bool {
        if self.policy_admits(dst, port) {
            return true;
        }
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
mod dns_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod peer_tests;
#[cfg(test)]
mod shutdown_tests;
#[cfg(test)]
mod tcp_tests;
#[cfg(test)]
mod tests;
