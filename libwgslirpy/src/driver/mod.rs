//! The tokio driver: the I/O edge around the sans-I/O [`Router`].
//!
//! # Shards
//! The gateway runs `config.shards` routers, each owned by a task of its own
//! with its own host sockets, so that flows are served on several worker
//! threads at once with no lock between them ([`crate::core::shard`]): the
//! tunnel hands each packet to the shard that owns its flow, reverse
//! forwards report to the shard of their DEST, a shard hands a datagram it
//! reassembled to the shard that owns it, and every shard writes to the
//! tunnel's encryption lanes, each peer's packets to one lane ([`lanes`]).
//! What follows holds for each shard's task.
//!
//! # One shard's task
//! The task owns its router. It waits on four things at once: packets from
//! the tunnel, events from host sockets, the router's next deadline, and
//! shutdown. After each wake-up it feeds the input to the router with the
//! current time, then carries out every output: socket actions first (so a
//! UDP send finds the socket opened just before it), then packets for the
//! tunnel. Nothing in this loop waits on a full queue: packets that the
//! tunnel cannot take yet stay in the router's bounded transmit queue (one
//! of them, whose lane was full, held in [`lanes`]), which drops and counts
//! what does not fit, as a TUN device would.
//!
//! Host sockets live here, keyed by the router's flow ids. No flow has a
//! task or a channel: the reactor marks a flow whose socket turned ready
//! due and wakes this task ([`ready`]), which services due sockets in place
//! after every wake-up and feeds the outcomes straight to the router:
//! - TCP ([`tcp`]): connect, write, and read within the credit the router
//!   grants. TCP data segments are made by the router only when the tunnel
//!   has room (a packet whose lane is full is held, and the loop waits for
//!   room in that lane before it takes another), so TCP toward the peers is
//!   paced by the tunnel, not dropped.
//! - UDP ([`udp`]) and ICMP echo ([`icmp`]): a bounded number of datagrams
//!   per socket per service, into one shared buffer, and only as many as
//!   the router's transmit queue has room for; the rest wait in the
//!   sockets' buffers until the tunnel takes packets.
//!
//! Events are taken in batches, like tunnel packets, so neither side
//! starves the other. DNS lookups and forwarded queries run in their own
//! tasks ([`dns`]) and report [`HostEvent`]s on a bounded channel.
//!
//! Reverse forwards ([`forward`]) listen on their HOST sockets from startup:
//! `-u` datagrams and `-t` accepted connections reach the router as events
//! too; an accepted connection the router takes becomes a TCP flow like any
//! other, and one it refuses is reset.
//!
//! Other tasks talk to the router tasks through a small bounded control
//! channel each ([`control`]): counter snapshots for the metrics server
//! ([`crate::metrics`]), summed over the shards, and the new peer list after
//! a reload, told to every shard.
//!
//! # Entry points
//! [`run`] does everything for a configuration and a shutdown future. To
//! also reach the running gateway (metrics, peer reloads), call
//! [`Gateway::bind`], keep [`Gateway::handle`], then [`Gateway::run`].
//!
//! # Shutdown
//! When the shutdown future completes (or a shard stops with an error): the
//! reverse forwards stop listening, then in every shard
//! [`Router::shut_down`] resets every TCP connection both ways and closes
//! every other flow, the task carries out those socket actions and then
//! flushes the packets queued for the tunnel (new SYNs meanwhile get RST),
//! for at most [`SHUTDOWN_FLUSH`]; when every shard is done, the tunnel
//! stops.

pub mod control;
mod dns;
mod forward;
mod icmp;
mod lanes;
mod ready;
mod tcp;
mod udp;

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::Config;
use crate::config::ConfigError;
use crate::core::shard::Shards;
use crate::core::{DnsOutcome, DnsQueryId, Router, SocketAction, Stats};
use crate::tunnel::{self, IpPacket, TunnelError, TunnelHandle};
use tcp::TcpEvent;
use udp::UdpEvent;

/// Most packets taken from the tunnel in one wake-up before other inputs get
/// a turn.
const TUNNEL_BATCH: usize = 64;
/// Most host events taken in one wake-up.
const EVENT_BATCH: usize = 64;
/// Most rounds of TCP socket service in one wake-up.
const TCP_ROUNDS: usize = 8;
/// How often the host's own addresses are listed again, so that an address
/// the host gains later (DHCP, a new interface) is denied too.
const HOST_ADDRESS_CHECK: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest the driver spends at shutdown carrying out the router's last
/// socket actions and handing its last packets (RSTs) to the tunnel.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);
/// After the last packet left the tunnel channel, how long the tunnel gets
/// to encrypt and send it before it is stopped: gotatun gives no signal
/// that its queue is empty.
const TUNNEL_GRACE: Duration = Duration::from_millis(50);

pub use control::{ControlError, GatewayHandle, RouterSnapshot};

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tunnel transport could not start.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// A reverse forward's HOST address could not be bound.
    #[error("cannot listen on {addr} for {flag}")]
    ForwardBind {
        /// The flag of the forward, `-u` or `-t`.
        flag: &'static str,
        /// The HOST address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel transport stopped on its own.
    #[error("the tunnel transport stopped unexpectedly")]
    TunnelClosed,
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr} for --metrics")]
    MetricsBind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Runs a gateway for `config` until `shutdown` completes.
///
/// Returns an error at once if the configuration is invalid or the tunnel
/// socket cannot be bound, so a front end can report it before anything
/// else happens. Must be called within a tokio runtime.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Gateway::bind(config).await?.run(shutdown).await
}

/// A gateway whose sockets are bound, not yet running: between
/// [`Gateway::bind`] and [`Gateway::run`], take a [`Gateway::handle`] to
/// reach it while it runs.
pub struct Gateway {
    config: Config,
    tunnel: TunnelHandle,
    udp_forwards: forward::UdpForwards,
    tcp_forwards: forward::TcpForwards,
    metrics: Option<tokio::net::TcpListener>,
    /// One control channel per shard.
    requests: Vec<mpsc::Sender<control::Request>>,
    control: Vec<mpsc::Receiver<control::Request>>,
}

impl Gateway {
    /// Validates `config` and binds everything it names: the reverse
    /// forwards' HOST sockets, the metrics address, then the tunnel socket.
    /// Must be called within a tokio runtime.
    pub async fn bind(config: Config) -> Result<Self, RunError> {
        config.validate()?;
        let (udp_forwards, tcp_forwards) = bind_forwards(&config)?;
        let metrics = match config.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let tunnel = tunnel::start(&config).await?;
        tracing::info!(local = %tunnel.local_addr, "tunnel socket bound");
        // One per shard, as the tunnel has one incoming channel per shard.
        let (requests, control) = (0..tunnel.incoming.len())
            .map(|_| mpsc::channel(control::CONTROL_QUEUE))
            .unzip();
        Ok(Gateway {
            config,
            tunnel,
            udp_forwards,
            tcp_forwards,
            metrics,
            requests,
            control,
        })
    }

    /// A handle for counters and peer reloads while the gateway runs.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            requests: self.requests.clone(),
            tunnel: self.tunnel.control.clone(),
        }
    }

    /// The address the metrics server listens on, if `--metrics` was given
    /// (with its real port when port 0 was asked for).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The tunnel socket's local address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.tunnel.local_addr
    }

    /// Runs the gateway until `shutdown` completes, then stops it
    /// gracefully (see the module documentation).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        // After the binds, so that a startup error stays the only line printed.
        raise_fd_limit();
        let handle = self.handle();
        let tunnel_control = self.tunnel.control.clone();
        let metrics = self.metrics.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving metrics at /metrics and /healthz");
            }
            tokio::spawn(crate::metrics::serve(listener, handle.clone()))
        });
        // `wg set` through the configuration socket changes the device's
        // peers behind the router's back; the router follows them.
        let follower = self
            .config
            .uapi_socket
            .is_some()
            .then(|| tokio::spawn(follow_device_peers(handle.clone(), tunnel_control)));
        // The gateway's own senders go, so the channels close with the
        // last handle.
        drop(self.requests);
        let result = run_shards(
            &handle,
            &self.config,
            self.tunnel,
            self.udp_forwards,
            self.tcp_forwards,
            self.control,
            shutdown,
        )
        .await;
        for task in [metrics, follower].into_iter().flatten() {
            task.abort();
        }
        result
    }
}

/// Runs one router task per shard until `shutdown` completes or a shard
/// stops with an error, then shuts every shard down (see the module
/// documentation) and stops the tunnel. Returns the first error.
async fn run_shards(
    gateway: &GatewayHandle,
    config: &Config,
    mut tunnel: TunnelHandle,
    mut udp_forwards: forward::UdpForwards,
    mut tcp_forwards: forward::TcpForwards,
    control: Vec<mpsc::Receiver<control::Request>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let shards = Shards::new(config.shards);
    let each = shards.config_for_each(config);
    let (events_tx, events): (Vec<_>, Vec<_>) = (0..shards.count())
        .map(|_| mpsc::channel(each.transmit_queue_capacity))
        .unzip();
    // A forward's sessions and connections live on the shard of its DEST.
    let udp_owner = |i: usize| shards.of_endpoint(config.incoming_udp[i].dest);
    let tcp_owner = |i: usize| shards.of_endpoint(config.incoming_tcp[i].dest);
    udp_forwards.start(|i| events_tx[udp_owner(i)].clone());
    tcp_forwards.start(|i| events_tx[tcp_owner(i)].clone());
    let dns_shared = dns::DnsShared::new(config);
    let (stop, stopping) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let incoming = std::mem::take(&mut tunnel.incoming);
    for (index, ((incoming, events), (events_tx, control))) in incoming
        .into_iter()
        .zip(events)
        .zip(events_tx.into_iter().zip(control))
        .enumerate()
    {
        let driver = Driver {
            router: Router::new(&each).in_shard(index, shards),
            incoming,
            lanes: lanes::Lanes::new(tunnel.outgoing.clone()),
            to_shards: tunnel.to_shards.clone(),
            dns: dns::DnsDriver::new(&each, &dns_shared, events_tx),
            tcp: tcp::TcpSockets::new(),
            udp: udp::UdpSockets::new(),
            echo: icmp::EchoSockets::new(index, shards.count()),
            forward_replies: udp_forwards.replies(),
            events,
            control,
            host_addresses: Vec::new(),
        };
        tasks.spawn(driver.run(stopping.clone()));
    }
    tokio::pin!(shutdown);
    let mut last = Stats::default();
    // A shard ends before the others only with an error.
    let mut result = tokio::select! {
        () = &mut shutdown => Ok(()),
        Some(ended) = tasks.join_next() => shard_result(ended).map(|stats| last.add(&stats)),
    };
    tcp_forwards.close();
    udp_forwards.close();
    // The counters as the gateway ran, before shutdown adds its own.
    match gateway.router_snapshot().await {
        Ok(before) => {
            let o = &before.occupancy;
            let flows = o.tcp_connections + o.udp_flows + o.icmp_ids;
            tracing::info!(flows, stats = ?before.stats, "shutting down: closing every flow");
        }
        Err(_) => tracing::info!("shutting down: closing every flow"),
    }
    let _ = stop.send(true);
    while let Some(ended) = tasks.join_next().await {
        match shard_result(ended) {
            Ok(stats) => last.add(&stats),
            Err(error) if result.is_ok() => result = Err(error),
            Err(_) => {}
        }
    }
    tracing::info!(
        resets_sent = last.tcp_resets_sent,
        dropped_meanwhile = last.dropped_shutdown,
        "shut down"
    );
    // gotatun gives no signal that its queue is empty.
    tokio::time::sleep(TUNNEL_GRACE).await;
    tunnel.close().await;
    result
}

/// What a shard's task ended with (its last counters); a panic in it goes
/// on unwinding here.
fn shard_result(
    ended: Result<Result<Stats, RunError>, tokio::task::JoinError>,
) -> Result<Stats, RunError> {
    match ended {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Only a runtime that is shutting down cancels the tasks.
        Err(_) => Err(RunError::TunnelClosed),
    }
}

/// How often the device's peer list is compared with the router's, when
/// `wg set` may change it.
const DEVICE_PEERS_CHECK: Duration = Duration::from_secs(1);

/// Tells the router task of every change to the device's peers (keys and
/// allowed IPs), such as `wg set NAME peer … allowed-ips …`, within
/// [`DEVICE_PEERS_CHECK`], so that a peer added at run time gets flow
/// tables of its own and a removed one's flows close.
async fn follow_device_peers(gateway: GatewayHandle, tunnel: tunnel::TunnelControl) {
    let mut known = tunnel.peer_routes().await;
    let mut check = tokio::time::interval(DEVICE_PEERS_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        let now = tunnel.peer_routes().await;
        let same = now.len() == known.len()
            && now
                .iter()
                .zip(&known)
                .all(|(a, b)| a.public_key == b.public_key && a.allowed_ips == b.allowed_ips);
        if same {
            continue;
        }
        tracing::info!(
            peers = now.len(),
            "the device's peers changed; the router follows"
        );
        if gateway.tell_peers(&now).await.is_err() {
            return;
        }
        known = now;
    }
}

/// Binds the HOST sockets of the reverse forwards.
fn bind_forwards(
    config: &Config,
) -> Result<(forward::UdpForwards, forward::TcpForwards), RunError> {
    let udp_forwards =
        forward::UdpForwards::bind(&config.incoming_udp).map_err(|(addr, source)| {
            RunError::ForwardBind {
                flag: "-u",
                addr,
                source,
            }
        })?;
    let tcp_forwards =
        forward::TcpForwards::bind(&config.incoming_tcp).map_err(|(addr, source)| {
            RunError::ForwardBind {
                flag: "-t",
                addr,
                source,
            }
        })?;
    Ok((udp_forwards, tcp_forwards))
}

/// The addresses of the host's own interfaces, which the access policy
/// denies by default. If they cannot be listed, that is logged and the
/// other default denials still apply.
fn host_addresses() -> Vec<std::net::IpAddr> {
    let interfaces = match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces,
        Err(error) => {
            tracing::warn!(%error, "cannot list the host's addresses; they are not denied");
            return Vec::new();
        }
    };
    let addresses: Vec<std::net::IpAddr> = interfaces
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(v4.ip().into())
            } else {
                address.as_sockaddr_in6().map(|v6| v6.ip().into())
            }
        })
        .collect();
    addresses
}

/// What host sockets report to the router task.
#[derive(Debug)]
enum HostEvent {
    /// A DNS lookup or forwarded query has a result.
    DnsResult {
        query: DnsQueryId,
        outcome: DnsOutcome,
    },
    /// A connection was accepted on a reverse TCP forward's HOST socket.
    TcpAccepted {
        forward: usize,
        stream: tokio::net::TcpStream,
        client: std::net::SocketAddr,
    },
    /// A datagram arrived on a reverse UDP forward's HOST socket.
    ForwardDatagram {
        forward: usize,
        from: std::net::SocketAddr,
        payload: bytes::Bytes,
    },
}

/// One shard's router task: its router, its host sockets, and its ends of
/// the channels.
struct Driver {
    router: Router,
    /// Packets from peers for this shard.
    incoming: mpsc::Receiver<IpPacket>,
    /// Packets for peers, into the encryption lanes every shard shares.
    lanes: lanes::Lanes,
    /// Every shard's `incoming`, for datagrams reassembled here that another
    /// shard owns.
    to_shards: Vec<mpsc::WeakSender<IpPacket>>,
    udp: udp::UdpSockets,
    dns: dns::DnsDriver,
    tcp: tcp::TcpSockets,
    echo: icmp::EchoSockets,
    forward_replies: forward::ForwardReplies,
    events: mpsc::Receiver<HostEvent>,
    /// The host's own addresses as last told to the router.
    host_addresses: Vec<std::net::IpAddr>,
    /// Requests from [`GatewayHandle`]s.
    control: mpsc::Receiver<control::Request>,
}

impl Driver {
    /// Tells the router the host's own addresses if they changed.
    fn check_host_addresses(&mut self) {
        let mut addresses = host_addresses();
        addresses.sort_unstable();
        addresses.dedup();
        if addresses != self.host_addresses {
            tracing::debug!(?addresses, "the host's own addresses, denied by default");
            self.router.set_host_addresses(&addresses);
            self.host_addresses = addresses;
        }
    }

    /// Serves this shard until `stopping` turns true (or its sender is
    /// gone), then shuts it down.
    async fn run(mut self, mut stopping: watch::Receiver<bool>) -> Result<Stats, RunError> {
        self.check_host_addresses();
        let mut host_check = tokio::time::interval(HOST_ADDRESS_CHECK);
        host_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the addresses were listed at startup.
        host_check.reset();
        loop {
            let deadline = self.router.poll_timeout();
            // A handle of its own, so that waiting for room borrows nothing of `self`.
            let blocked = self.lanes.blocked_lane();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                // Only `true` is ever sent; a sender gone means stop too.
                _ = stopping.changed() => return self.shut_down().await,
                packet = self.incoming.recv() => {
                    let packet = packet.ok_or(RunError::TunnelClosed)?;
                    let now = Instant::now();
                    self.router.handle_owned_packet(now, packet.freeze());
                    for _ in 1..TUNNEL_BATCH {
                        let Ok(packet) = self.incoming.try_recv() else { break };
                        self.router.handle_owned_packet(now, packet.freeze());
                    }
                    // Host events get their turn even when the tunnel is busy.
                    self.drain_events(EVENT_BATCH)?;
                }
                Some(event) = self.events.recv() => {
                    self.handle_event(event);
                    self.drain_events(EVENT_BATCH - 1)?;
                }
                // `drain` below services the due TCP, UDP and ICMP sockets.
                () = std::future::poll_fn(|cx| self.tcp.poll_due(cx)) => {}
                // Without room for their datagrams, due UDP and ICMP
                // sockets wait for the tunnel to take packets (below).
                () = std::future::poll_fn(|cx| self.udp.poll_due(cx)),
                    if self.router.transmit_room() > 0 => {}
                () = std::future::poll_fn(|cx| self.echo.poll_due(cx)),
                    if self.router.transmit_room() > 0 => {}
                permit = lanes::room(&blocked), if blocked.is_some() => {
                    let permit = permit.map_err(|_| RunError::TunnelClosed)?;
                    self.lanes.send_held(permit);
                }
                // Handled below.
                () = timer => {}
                _ = host_check.tick() => self.check_host_addresses(),
                Some(request) = self.control.recv() => self.handle_request(request),
            }
            // Whichever branch woke the task: a tunnel that is never empty
            // must not hold back the router's timers (RTOs, delayed ACKs).
            let now = Instant::now();
            if deadline.is_some_and(|at| at <= now) {
                self.router.handle_timeout(now);
            }
            self.drain()?;
        }
    }

    /// Answers a request from a [`GatewayHandle`].
    fn handle_request(&mut self, request: control::Request) {
        match request {
            control::Request::Snapshot(reply) => {
                let _ = reply.send(RouterSnapshot {
                    stats: self.router.stats().clone(),
                    occupancy: self.router.occupancy(),
                    peers: self.router.peer_stats(),
                    shutting_down: self.router.is_shutting_down(),
                });
            }
            control::Request::PeersReloaded(peers) => {
                // The tunnel now has exactly `peers` (a SIGHUP reload, or an
                // embedder's `GatewayHandle::reload_peers`); the router's
                // per-peer flow tables follow, closing a removed peer's flows.
                self.router.set_peers(&peers);
                tracing::debug!(peers = peers.len(), "router told of the reloaded peers");
            }
        }
    }

    /// Stops gracefully: no new flows, every flow closed toward both
    /// sides, the last packets flushed to the tunnel (for at most
    /// [`SHUTDOWN_FLUSH`]). Returns the router's last counters.
    async fn shut_down(mut self) -> Result<Stats, RunError> {
        let now = Instant::now();
        let deadline = now + SHUTDOWN_FLUSH;
        self.router.shut_down(now);
        self.drain()?;
        loop {
            if !self.router.has_transmit() && self.lanes.is_flushed() {
                break;
            }
            let blocked = self.lanes.blocked_lane();
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline.into()) => {
                    tracing::warn!("shutting down: the tunnel did not take every last packet in time");
                    break;
                }
                permit = lanes::room(&blocked), if blocked.is_some() => {
                    let Ok(permit) = permit else { break };
                    self.lanes.send_held(permit);
                }
                // Still listening, so that new SYNs get RST and late socket
                // events are dealt with.
                Some(packet) = self.incoming.recv() => {
                    self.router.handle_owned_packet(Instant::now(), packet.freeze());
                }
                Some(event) = self.events.recv() => self.handle_event(event),
                Some(request) = self.control.recv() => self.handle_request(request),
                // The tunnel empties its channel without telling us.
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if self.drain().is_err() {
                break;
            }
        }
        Ok(self.router.stats().clone())
    }

    /// Feeds one host event to the router.
    fn handle_event(&mut self, event: HostEvent) {
        let now = Instant::now();
        match event {
            HostEvent::ForwardDatagram {
                forward,
                from,
                payload,
            } => self
                .router
                .handle_forward_datagram(now, forward, from, &payload),
            HostEvent::DnsResult { query, outcome } => {
                self.dns.finished(query);
                self.router.handle_dns_result(now, query, outcome);
            }
            HostEvent::TcpAccepted {
                forward,
                stream,
                client,
            } => match self.router.handle_tcp_accepted(now, forward, client) {
                Some(flow) => self.tcp.adopt(flow, stream),
                None => tcp::reset(stream),
            },
        }
    }

    /// Feeds up to `max` waiting host events to the router, carrying out
    /// its outputs as it goes so that its queues stay short.
    fn drain_events(&mut self, max: usize) -> Result<(), RunError> {
        for _ in 0..max {
            let Ok(event) = self.events.try_recv() else {
                break;
            };
            self.handle_event(event);
            self.drain()?;
        }
        Ok(())
    }

    /// Carries out every pending output of the router.
    fn drain(&mut self) -> Result<(), RunError> {
        self.carry_out_socket_actions();
        let now = Instant::now();
        // Datagrams for the peer are read only while the router's transmit
        // queue has room for them; the rest wait in the sockets' buffers.
        let mut room = self.router.transmit_room();
        let router = &mut self.router;
        self.udp.service(&mut room, |flow, event| match event {
            UdpEvent::Datagram { from, payload } => {
                router.handle_udp_datagram(now, flow, from, payload);
            }
            UdpEvent::Unreachable { dest, why } => {
                router.handle_udp_unreachable(now, flow, dest, why);
            }
        });
        self.echo.service(&mut room, |flow, reply| {
            router.handle_echo_reply(now, flow, reply.from, reply.seq_no, reply.payload);
        });
        // TCP sockets are serviced in place: what they report goes to the
        // core, whose answer (ACKs, more actions) goes round again. Flows
        // still due after the last round keep `TcpSockets::poll_due` ready.
        for _ in 0..TCP_ROUNDS {
            self.carry_out_socket_actions();
            let now = Instant::now();
            let router = &mut self.router;
            let serviced = self.tcp.service(|flow, event| match event {
                TcpEvent::Connected => router.handle_tcp_connected(now, flow),
                TcpEvent::ConnectFailed(error) => {
                    router.handle_tcp_connect_failed(now, flow, error);
                }
                TcpEvent::Readable(read) => {
                    router.handle_tcp_read(now, flow, read.max(), |room| read.read_into(room));
                }
                TcpEvent::Eof => router.handle_tcp_eof(now, flow),
                TcpEvent::Written(n) => router.handle_tcp_written(now, flow, n),
                TcpEvent::Error => router.handle_tcp_error(now, flow),
            });
            if !serviced {
                break;
            }
        }
        self.carry_out_socket_actions();
        // Packets wait in the router's bounded queue until the tunnel has
        // room; the router drops (and counts) what does not fit there.
        self.lanes
            .fill(&mut self.router)
            .map_err(|lanes::Closed| RunError::TunnelClosed)?;
        self.reroute();
        Ok(())
    }

    /// Hands the datagrams reassembled here that other shards own to those
    /// shards, without waiting: while the next one's shard has no room, it
    /// waits in the router (bounded there) for a later wake-up.
    fn reroute(&mut self) {
        while let Some(shard) = self.router.reroute_target() {
            let Some(to) = self.to_shards[shard].upgrade() else {
                break;
            };
            let Ok(permit) = to.try_reserve() else {
                break;
            };
            if let Some((_, packet)) = self.router.poll_reroute() {
                permit.send(packet);
            }
        }
    }

    /// Carries out the router's socket actions.
    fn carry_out_socket_actions(&mut self) {
        while let Some(action) = self.router.poll_socket_action() {
            match action {
                SocketAction::UdpOpen { flow, ipv6 } => {
                    if let Err(error) = self.udp.open(flow, ipv6) {
                        tracing::warn!(flow = flow.0, %error, "cannot open a UDP socket");
                        self.router.handle_udp_failed(Instant::now(), flow);
                    }
                }
                SocketAction::UdpSend {
                    flow,
                    dest,
                    payload,
                } => self.udp.send(flow, dest, &payload),
                SocketAction::UdpClose { flow } => self.udp.close(flow),
                SocketAction::DnsResolve { query, name } => self.dns.resolve(query, name),
                SocketAction::DnsForward { query, message } => self.dns.forward(query, message),
                SocketAction::DnsCancel { query } => self.dns.cancel(query),
                SocketAction::TcpConnect { flow, dest } => match self.tcp.connect(flow, dest) {
                    Ok(tcp::Connect::Connected) => {
                        self.router.handle_tcp_connected(Instant::now(), flow);
                    }
                    Ok(tcp::Connect::Pending) => {}
                    Err(error) => {
                        self.router
                            .handle_tcp_connect_failed(Instant::now(), flow, error);
                    }
                },
                SocketAction::TcpWrite { flow, data } => self.tcp.write(flow, data),
                SocketAction::TcpRead { flow, max } => self.tcp.read(flow, max),
                SocketAction::TcpShutdownWrite { flow } => self.tcp.shutdown_write(flow),
                SocketAction::TcpClose { flow } => self.tcp.close(flow),
                SocketAction::TcpAbort { flow } => self.tcp.abort(flow),
                SocketAction::IcmpOpen { flow, ipv6 } => {
                    if let Err(error) = self.echo.open(flow, ipv6) {
                        tracing::debug!(flow = flow.0, %error, "cannot open an ICMP socket");
                        self.router.handle_icmp_failed(Instant::now(), flow);
                    }
                }
                SocketAction::IcmpSend {
                    flow,
                    dest,
                    seq_no,
                    data,
                } => self.echo.send(flow, dest, seq_no, &data),
                SocketAction::IcmpClose { flow } => self.echo.close(flow),
                SocketAction::ForwardUdpSend {
                    forward,
                    to,
                    payload,
                } => self.forward_replies.send(forward, to, &payload),
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every TCP
/// connection holds a socket. Logs what it got.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        Ok((soft, hard.max(soft)))
    });
    match raised {
        Ok((before, after)) => tracing::info!(before, after, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}
