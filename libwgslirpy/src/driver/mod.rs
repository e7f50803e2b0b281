//! The tokio driver: the I/O edge around the sans-I/O [`Router`].
//!
//! One task owns the router. It waits on four things at once: packets from
//! the tunnel, events from host sockets, the router's next deadline, and
//! shutdown. After each wake-up it feeds the input to the router with the
//! current time, then carries out every output: socket actions first (so a
//! UDP send finds the socket opened just before it), then packets for the
//! tunnel. Nothing in this loop waits on a full queue: packets that the
//! tunnel cannot take yet stay in the router's bounded transmit queue, which
//! drops and counts what does not fit, as a TUN device would.
//!
//! Host sockets live here, keyed by the router's [`FlowId`]s. Each UDP socket
//! has a reader task that turns datagrams into [`HostEvent`]s on a bounded
//! channel; a slow router makes those tasks wait, and the kernel's socket
//! buffers absorb or drop the excess, per socket.
//!
//! DNS lookups and forwarded queries run in their own tasks ([`dns`]) and
//! report on the same channel.
//!
//! TCP sockets ([`tcp`]) have no task and no channel: the reactor marks a
//! ready socket's flow due and wakes this task, which services due sockets
//! in place after every wake-up (connect, write, read within credit) and
//! feeds the outcomes straight to the router. TCP data segments are made by
//! the router only when the tunnel has room (the loop waits for room while
//! the router has something to send), so TCP toward the peers is paced by
//! the tunnel, not dropped. Events are taken in batches, like tunnel
//! packets, so neither side starves the other.
//!
//! Reverse forwards ([`forward`]) listen on their HOST sockets from startup:
//! `-u` datagrams and `-t` accepted connections reach the router as events
//! too; an accepted connection the router takes becomes a TCP flow like any
//! other, and one it refuses is reset.

mod dns;
mod forward;
mod icmp;
mod tcp;
mod udp;

use std::future::Future;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::Config;
use crate::config::ConfigError;
use crate::core::{DnsOutcome, DnsQueryId, FlowId, Router, SocketAction};
use crate::tunnel::{self, TunnelError, TunnelHandle};
use tcp::TcpEvent;

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
}

/// Runs a gateway for `config` until `shutdown` completes.
///
/// Returns an error at once if the configuration is invalid or the tunnel
/// socket cannot be bound, so a front end can report it before anything
/// else happens. Must be called within a tokio runtime.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    config.validate()?;
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
    let tunnel = tunnel::start(&config).await?;
    tracing::info!(local = %tunnel.local_addr, "tunnel socket bound");
    // After the bind, so that a startup error stays the only line printed.
    raise_fd_limit();
    Driver::new(&config, tunnel, udp_forwards, tcp_forwards)
        .run(shutdown)
        .await
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
    /// A datagram arrived on a flow's UDP socket.
    UdpDatagram {
        flow: FlowId,
        from: std::net::SocketAddr,
        payload: bytes::Bytes,
    },
    /// A DNS lookup or forwarded query has a result.
    DnsResult {
        query: DnsQueryId,
        outcome: DnsOutcome,
    },
    /// A destination of a flow's UDP socket answered with an ICMP error.
    UdpUnreachable {
        flow: FlowId,
        dest: std::net::SocketAddr,
        why: crate::core::packet::IcmpError,
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
    /// An echo reply arrived on a flow's ICMP socket.
    EchoReply {
        flow: FlowId,
        from: std::net::IpAddr,
        seq_no: u16,
        payload: bytes::Bytes,
    },
}

struct Driver {
    router: Router,
    tunnel: TunnelHandle,
    udp: udp::UdpSockets,
    dns: dns::DnsDriver,
    tcp: tcp::TcpSockets,
    echo: icmp::EchoSockets,
    udp_forwards: forward::UdpForwards,
    /// Owned only so that the accepting tasks stop with the driver.
    _tcp_forwards: forward::TcpForwards,
    events: mpsc::Receiver<HostEvent>,
    /// The host's own addresses as last told to the router.
    host_addresses: Vec<std::net::IpAddr>,
}

impl Driver {
    fn new(
        config: &Config,
        tunnel: TunnelHandle,
        mut udp_forwards: forward::UdpForwards,
        mut tcp_forwards: forward::TcpForwards,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(config.transmit_queue_capacity);
        udp_forwards.start(&events_tx);
        tcp_forwards.start(&events_tx);
        let mut driver = Driver {
            router: Router::new(config),
            tunnel,
            dns: dns::DnsDriver::new(config, events_tx.clone()),
            tcp: tcp::TcpSockets::new(),
            udp: udp::UdpSockets::new(events_tx.clone()),
            echo: icmp::EchoSockets::new(events_tx),
            udp_forwards,
            _tcp_forwards: tcp_forwards,
            events,
            host_addresses: Vec::new(),
        };
        driver.check_host_addresses();
        driver
    }

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

    async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        tokio::pin!(shutdown);
        let mut host_check = tokio::time::interval(HOST_ADDRESS_CHECK);
        host_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the addresses were listed at startup.
        host_check.reset();
        loop {
            let deadline = self.router.poll_timeout();
            // A handle of its own, so that waiting for room borrows nothing of `self`.
            let outgoing = self.tunnel.outgoing.clone();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!(stats = ?self.router.stats(), "shutting down");
                    self.tunnel.close().await;
                    return Ok(());
                }
                packet = self.tunnel.incoming.recv() => {
                    let packet = packet.ok_or(RunError::TunnelClosed)?;
                    let now = Instant::now();
                    self.router.handle_packet(now, &packet);
                    for _ in 1..TUNNEL_BATCH {
                        let Ok(packet) = self.tunnel.incoming.try_recv() else { break };
                        self.router.handle_packet(now, &packet);
                    }
                    // Host events get their turn even when the tunnel is busy.
                    self.drain_events(EVENT_BATCH)?;
                }
                Some(event) = self.events.recv() => {
                    self.handle_event(event);
                    self.drain_events(EVENT_BATCH - 1)?;
                }
                // `drain` below services the due TCP sockets.
                () = std::future::poll_fn(|cx| self.tcp.poll_due(cx)) => {}
                permit = outgoing.reserve(), if self.router.has_transmit() => {
                    let permit = permit.map_err(|_| RunError::TunnelClosed)?;
                    if let Some(packet) = self.router.poll_transmit() {
                        permit.send(packet);
                    }
                }
                () = timer => self.router.handle_timeout(Instant::now()),
                _ = host_check.tick() => self.check_host_addresses(),
            }
            self.drain()?;
        }
    }

    /// Feeds one host event to the router.
    fn handle_event(&mut self, event: HostEvent) {
        let now = Instant::now();
        match event {
            HostEvent::UdpDatagram {
                flow,
                from,
                payload,
            } => {
                self.router.handle_udp_datagram(now, flow, from, &payload);
            }
            HostEvent::UdpUnreachable { flow, dest, why } => {
                self.router.handle_udp_unreachable(now, flow, dest, why);
            }
            HostEvent::ForwardDatagram {
                forward,
                from,
                payload,
            } => self
                .router
                .handle_forward_datagram(now, forward, from, &payload),
            HostEvent::EchoReply {
                flow,
                from,
                seq_no,
                payload,
            } => self
                .router
                .handle_echo_reply(now, flow, from, seq_no, &payload),
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
        // TCP sockets are serviced in place: what they report goes to the
        // core, whose answer (ACKs, more actions) goes round again. Flows
        // still due after the last round keep `Tcp::poll_due` ready.
        for _ in 0..TCP_ROUNDS {
            self.carry_out_socket_actions();
            let now = Instant::now();
            let router = &mut self.router;
            let serviced = self.tcp.service(|flow, event| match event {
                TcpEvent::Connected => router.handle_tcp_connected(now, flow),
                TcpEvent::ConnectFailed(error) => {
                    router.handle_tcp_connect_failed(now, flow, error);
                }
                TcpEvent::Data(data) => router.handle_tcp_data(now, flow, data),
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
        loop {
            let permit = match self.tunnel.outgoing.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => return Err(RunError::TunnelClosed),
            };
            let Some(packet) = self.router.poll_transmit() else {
                break;
            };
            permit.send(packet);
        }
        Ok(())
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
                } => self.udp_forwards.send(forward, to, &payload),
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
