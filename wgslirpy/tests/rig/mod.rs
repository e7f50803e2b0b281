//! End-to-end test rig for the `wgslirpy` binary.
//!
//! # What it builds
//!
//! Every [`Rig`] is a private, three-namespace network made with `ip netns` and veth pairs:
//!
//! ```text
//!   peer ns                    gateway ns                      internet ns
//!  +----------------------+     +--------------------------+     +---------------------+
//!  | wireguard-go wg<tag> |     | wgslirpy (under test)    |     | UDP/TCP echo, HTTP, |
//!  |  or socat TUN raw0   |     |  -b 198.18.1.1:51820     |     | iperf3 servers      |
//!  | default routes: tun  |     | default routes: inet ns  |     | no route to the     |
//!  |                  up0 +-----+ peer0              inet0 +-----+ gw0  peer underlay  |
//!  +----------------------+veth +--------------------------+veth +---------------------+
//! ```
//!
//! * **peer ns**: a WireGuard peer (`wireguard-go -f`, configured with `wg set`), or in raw-IP
//!   mode a `socat TUN:… UDP-SENDTO:…` pair that puts bare IP packets into UDP datagrams. The
//!   tunnel carries the inner addresses and both default routes, so everything the peer sends
//!   beyond its underlay subnet goes through the gateway.
//! * **gateway ns**: runs `wgslirpy` (as root, or as `nobody` with no capabilities, see
//!   [`RigBuilder::unprivileged`]) with stdout/stderr captured to a file. It gets its own
//!   `/etc/netns/<ns>/hosts` (naming the internet server [`INET_HOSTNAME`]) and
//!   `/etc/netns/<ns>/resolv.conf` (pointing only at the internet ns).
//! * **internet ns**: test servers chosen with the builder, bound dual-stack on its addresses.
//!
//! # Usage
//!
//! ```ignore
//! let Some(mut rig) = Rig::builder("my_test").udp_echo().start() else {
//!     return; // skipped: not root (a failure under CI=true)
//! };
//! rig.wait_handshake(Duration::from_secs(10));
//! rig.assert_ping(PINGABLE_V4.into(), 3);
//! let echo = SocketAddr::new(INET_V4.into(), UDP_ECHO_PORT);
//! let reply = rig.udp_roundtrip(&rig.peer, echo, b"hi", 5, Duration::from_secs(1));
//! ```
//!
//! [`RigBuilder`] chooses the mode (WireGuard or raw IP), underlay family, who knows whose
//! endpoint, keepalives, `-P` addresses, extra gateway arguments, root or `nobody`, and the
//! internet servers. [`Rig`] then offers: [`Netns::run`]/[`Netns::ok`]/[`Netns::ip`] to run
//! commands in a namespace with a timeout, [`Rig::spawn`] for more background processes,
//! [`Rig::wait_handshake`] and `wg show` parsing, [`Rig::ping`], [`Rig::udp_roundtrip`],
//! [`Rig::tcp_roundtrip`], [`Rig::http_get`], [`Rig::roam_peer_v4`],
//! [`Rig::add_extra_wg_peer`], a second peer namespace ([`Rig::add_peer_netns`], with
//! [`Rig::start_wireguard_go`] for a device in it), and gateway control ([`Rig::start_gateway`],
//! [`Rig::stop_gateway`], [`Rig::gateway_log`]).
//!
//! # Address plan
//!
//! The addresses are the same in every rig: each rig has its own namespaces, so they never
//! meet. Only names that live in shared places are unique per rig: namespace names
//! (`wgs-<pid>-<n>-peer|gw|inet`) and WireGuard device names (`wg<pid>-<n>…`, whose control
//! sockets live in `/var/run/wireguard`). Hence tests run in parallel threads, in parallel
//! processes and repeatedly.
//!
//! | link / role                      | IPv4 (198.18.0.0/15)        | IPv6 (ULA)          |
//! |----------------------------------|-----------------------------|---------------------|
//! | peer underlay (`up0`)            | 198.18.1.2/24 (roams to .3) | fd00:1::2/64        |
//! | gateway underlay (`peer0`)       | 198.18.1.1/24 port 51820    | fd00:1::1/64        |
//! | gateway internet side (`inet0`)  | 198.18.2.1/24               | fd00:2::1/64        |
//! | internet server (`gw0`)          | 198.18.2.2/24               | fd00:2::2/64        |
//! | peer inner (in the tunnel)       | 198.19.77.2                 | fd77::2             |
//! | gateway inner (`-P`, `-D`)       | 198.19.77.1                 | fd77::1             |
//! | second peer ns underlay (`up0`)  | 198.18.3.2/24               | fd00:3::2/64        |
//! | gateway side of it (`peer1`)     | 198.18.3.1/24               | fd00:3::1/64        |
//!
//! # Network rule
//!
//! The namespaces have no link to the host's own network: every packet a test makes stays
//! on loopback or inside the namespaces its rig created.
//!
//! # Cleanup guarantees
//!
//! [`Rig`]'s `Drop` runs also while a test panics: it prints diagnostics first if panicking
//! (gateway log, peer/server logs, `wg show`, addresses), then stops every process it started by
//! PID (SIGTERM, then SIGKILL after a grace period), kills any other process left inside its
//! namespaces (by PID, from `ip netns pids`), deletes the namespaces, their `/etc/netns` dirs,
//! stale WireGuard control sockets and its temp dir. Leftovers of a test process that was
//! killed outright are reaped by the next rig that starts (namespaces named after a PID that
//! no longer exists). Nothing is ever killed by name. Set `WGS_RIG_KEEP=1` to keep a rig for
//! inspection (its names are printed), and `WGS_RIG_BINARY=<path>` to test another build.
//!
//! # When the machine can't run it
//!
//! The rig needs root, a working `ip netns`, `/dev/net/tun` and the tools `ip`, `sysctl`,
//! `wireguard-go`, `wg`, `ping`, `python3`, `socat`, `setpriv` (and `iperf3` if asked for, and
//! whatever a test names with [`RigBuilder::needs_tool`]).
//! (Debian: iproute2 procps wireguard-go wireguard-tools iputils-ping python3 socat
//! util-linux iperf3.)
//! Without them [`RigBuilder::start`] writes one line
//! `SKIPPING end-to-end test <name>: needs root and ip netns (<reason>)` straight to stderr
//! (visible despite test output capture) and returns `None`: the test returns early. When the
//! environment variable `CI` is `true` (or `1`) it panics instead, so CI can't pass by skipping.
//!
//! The module also has helpers usable without root: [`run_timeout`], [`wait_until`],
//! [`Proc`], [`bound_sockets`], [`signals_caught`].

#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod gateway;
mod metrics;
mod netns;
mod peer;
mod process;
mod servers;
mod traffic;

// Not every suite scrapes the metrics server.
#[allow(unused_imports)]
pub use metrics::*;
pub use netns::*;
pub use peer::*;
pub use process::*;
use servers::*;

// ---------------------------------------------------------------------------------------------
// Address plan
// ---------------------------------------------------------------------------------------------

/// Peer's underlay address (on `up0` in the peer ns).
pub const PEER_UNDERLAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// Address [`Rig::roam_peer_v4`] is typically given to move the peer to.
pub const PEER_UNDERLAY_V4_ROAMED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
pub const PEER_UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
/// Gateway's underlay address (on `peer0` in the gateway ns); `wgslirpy -b` binds here.
pub const GW_UNDERLAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const GW_UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// Prefix length of both underlay subnets.
pub const UNDERLAY_PREFIX_V4: u8 = 24;
pub const UNDERLAY_PREFIX_V6: u8 = 64;
/// Underlay of the second peer namespace ([`Rig::add_peer_netns`]) and the gateway's side of
/// its link.
pub const PEER2_UNDERLAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
pub const PEER2_UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 2);
pub const GW_PEER2_SIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
pub const GW_PEER2_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 1);
/// Gateway's internet-side address: what the internet servers see as the source.
pub const GW_INET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub const GW_INET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
/// The internet server's address (in the internet ns).
pub const INET_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
pub const INET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
/// Name of the internet server in the gateway ns's `/etc/hosts`.
pub const INET_HOSTNAME: &str = "internet.test";
/// Peer's address inside the tunnel.
pub const PEER_INNER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 2);
pub const PEER_INNER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
/// The gateway's own addresses inside the tunnel (`-P`; also meant for `-D` as `:53`).
pub const PINGABLE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 1);
pub const PINGABLE_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// UDP port `wgslirpy` listens on in the gateway ns.
pub const GW_PORT: u16 = 51820;
/// UDP port of the peer's WireGuard (or socat) socket.
pub const PEER_PORT: u16 = 51821;
/// Ports of the internet servers.
pub const UDP_ECHO_PORT: u16 = 7;
pub const TCP_ECHO_PORT: u16 = 7;
pub const HTTP_PORT: u16 = 80;
pub const IPERF3_PORT: u16 = 5201;
/// MTU of the peer's tunnel device.
pub const TUNNEL_MTU: u32 = 1420;

/// Timeout of one helper command unless a caller gives its own.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling period of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(50);
/// How long a process gets between SIGTERM and SIGKILL at cleanup.
const STOP_GRACE: Duration = Duration::from_secs(2);
const PYTHON_CANDIDATES: [&str; 2] = ["/usr/bin/python3", "python3"];

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Internet-ns servers a rig can start (all dual-stack, on the fixed ports above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// Echoes UDP datagrams back to their sender ([`UDP_ECHO_PORT`]); logs `<src ip> <src
    /// port> <len>` for each.
    UdpEcho,
    /// Echoes a TCP stream until EOF, then half-closes ([`TCP_ECHO_PORT`]).
    TcpEcho,
    /// `python3 -m http.server` serving the files given with [`RigBuilder::http_file`].
    Http,
    /// `iperf3 -s` ([`IPERF3_PORT`]).
    Iperf3,
}

/// How a [`Rig`] is set up; made with [`Rig::builder`], started with [`RigBuilder::start`].
///
/// Defaults: WireGuard mode over an IPv4 underlay; the gateway gets `-p <peer endpoint>` and
/// no `-a`; the peer knows the gateway's endpoint with a 5 s persistent keepalive (so it
/// handshakes right away); `-P` for both [`PINGABLE_V4`] and [`PINGABLE_V6`]; gateway runs as
/// root with `RUST_LOG=debug`; no servers.
#[derive(Clone, Debug)]
pub struct RigBuilder {
    test: String,
    raw_ip: bool,
    underlay_v6: bool,
    gateway_endpoint: bool,
    gateway_keepalive: Option<u32>,
    peer_endpoint: bool,
    peer_keepalive: Option<u32>,
    pingable_v4: bool,
    pingable_v6: bool,
    unprivileged: bool,
    key_file: bool,
    extra_args: Vec<String>,
    rust_log: String,
    servers: Vec<Server>,
    http_files: Vec<(String, Vec<u8>)>,
    start_gateway: bool,
    /// Programs the test itself runs beyond the rig's own (see [`RigBuilder::needs_tool`]).
    tools: Vec<String>,
}

impl RigBuilder {
    /// Raw-IP-over-UDP mode: gateway `-k INSECURE -K GUE`, peer is `socat` with a TUN device.
    pub fn raw_ip(mut self) -> Self {
        self.raw_ip = true;
        self
    }

    /// Gateway and peer talk over IPv6 underlay addresses instead of IPv4.
    pub fn underlay_v6(mut self) -> Self {
        self.underlay_v6 = true;
        self
    }

    /// Whether the gateway gets `-p <peer's underlay endpoint>` (default yes).
    pub fn gateway_endpoint(mut self, on: bool) -> Self {
        self.gateway_endpoint = on;
        self
    }

    /// Gateway `-a <secs>` (default none).
    pub fn gateway_keepalive(mut self, secs: Option<u32>) -> Self {
        self.gateway_keepalive = secs;
        self
    }

    /// Whether the peer is told the gateway's endpoint (default yes). Without it the peer
    /// only answers; the gateway must initiate (needs [`Self::gateway_endpoint`]).
    pub fn peer_endpoint(mut self, on: bool) -> Self {
        self.peer_endpoint = on;
        self
    }

    /// Peer's `persistent-keepalive` (default 5 s; needs [`Self::peer_endpoint`]).
    pub fn peer_keepalive(mut self, secs: Option<u32>) -> Self {
        self.peer_keepalive = secs;
        self
    }

    /// Whether the gateway gets `-P` [`PINGABLE_V4`] (default yes).
    pub fn pingable_v4(mut self, on: bool) -> Self {
        self.pingable_v4 = on;
        self
    }

    /// Whether the gateway gets `-P` [`PINGABLE_V6`] (default yes).
    pub fn pingable_v6(mut self, on: bool) -> Self {
        self.pingable_v6 = on;
        self
    }

    /// Run the gateway as `nobody:nogroup` with no supplementary groups, no capabilities
    /// (empty bounding and inheritable sets) and `no_new_privs`, from a copy of the binary in
    /// the rig's temp dir.
    pub fn unprivileged(mut self) -> Self {
        self.unprivileged = true;
        self
    }

    /// Pass the gateway's private key with `-f <file>` instead of `-k`.
    pub fn key_file(mut self) -> Self {
        self.key_file = true;
        self
    }

    /// Extra gateway arguments, appended after the ones the rig makes.
    pub fn gateway_args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The gateway's `RUST_LOG` (default `debug`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_owned();
        self
    }

    /// Start this internet-ns server (before the gateway; waits until it listens).
    pub fn server(mut self, server: Server) -> Self {
        if !self.servers.contains(&server) {
            self.servers.push(server);
        }
        self
    }

    pub fn udp_echo(self) -> Self {
        self.server(Server::UdpEcho)
    }

    pub fn tcp_echo(self) -> Self {
        self.server(Server::TcpEcho)
    }

    pub fn iperf3(self) -> Self {
        self.server(Server::Iperf3)
    }

    /// Serve `contents` as `/<name>` from the HTTP server (starts it).
    pub fn http_file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.http_files.push((name.to_owned(), contents.into()));
        self.server(Server::Http)
    }

    /// The test runs `program` itself (e.g. with [`Rig::spawn`]): without it on `PATH` the test
    /// is skipped like one missing a rig tool (a failure under `CI=true`).
    pub fn needs_tool(mut self, program: &str) -> Self {
        self.tools.push(program.to_owned());
        self
    }

    /// Don't start the gateway; the test calls [`Rig::start_gateway`] itself (the peer is
    /// set up all the same).
    pub fn defer_gateway(mut self) -> Self {
        self.start_gateway = false;
        self
    }

    /// Builds the rig. `None` means "skip this test" (see the module docs; under `CI=true`
    /// it panics instead). Panics, after cleaning up, if any setup step fails.
    pub fn start(self) -> Option<Rig> {
        if let Err(reason) = environment() {
            skip_or_fail(&self.test, reason);
            return None;
        }
        let mut missing: Vec<&str> = self
            .tools
            .iter()
            .map(String::as_str)
            .filter(|t| which(t).is_none())
            .collect();
        if self.servers.contains(&Server::Iperf3) && which("iperf3").is_none() {
            missing.push("iperf3");
        }
        if !missing.is_empty() {
            skip_or_fail(
                &self.test,
                &format!("missing tools: {}", missing.join(", ")),
            );
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("wgs-rig-{tag}"));
        let mut rig = Rig {
            peer: Netns {
                name: format!("wgs-{tag}-peer"),
            },
            gw: Netns {
                name: format!("wgs-{tag}-gw"),
            },
            inet: Netns {
                name: format!("wgs-{tag}-inet"),
            },
            wg_dev: format!("wg{tag}"),
            dir,
            tag,
            gw_keys: None,
            peer_keys: None,
            gateway: None,
            gateway_cmd: Vec::new(),
            procs: Vec::new(),
            wg_devs: Vec::new(),
            extra_ns: Vec::new(),
            peer_underlay_v4: PEER_UNDERLAY_V4,
            cfg: self,
        };
        rig.setup();
        Some(rig)
    }
}

// ---------------------------------------------------------------------------------------------
// The rig
// ---------------------------------------------------------------------------------------------

/// Handle of a process started with [`Rig::spawn`] (or a builder server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId(usize);

/// Result of [`Rig::ping`].
#[derive(Debug)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    pub output: CmdOutput,
}

/// A datagram received by [`Rig::udp_roundtrip`].
#[derive(Debug, PartialEq, Eq)]
pub struct UdpReply {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// A running test network: see the module docs.
pub struct Rig {
    pub peer: Netns,
    pub gw: Netns,
    pub inet: Netns,
    /// The peer's WireGuard device (in the peer ns); in raw-IP mode the socat TUN is `raw0`.
    pub wg_dev: String,
    /// `<pid>-<n>`: unique per rig on this machine.
    pub tag: String,
    /// The rig's temp dir (mode 0755): logs, keys, scripts, web root.
    pub dir: PathBuf,
    gw_keys: Option<KeyPair>,
    peer_keys: Option<KeyPair>,
    gateway: Option<Proc>,
    gateway_cmd: Vec<String>,
    procs: Vec<Proc>,
    wg_devs: Vec<String>,
    /// Namespaces added after setup ([`Rig::add_peer_netns`]).
    extra_ns: Vec<Netns>,
    peer_underlay_v4: Ipv4Addr,
    cfg: RigBuilder,
}

impl Rig {
    /// Starts describing a rig for the test called `test` (used in messages).
    pub fn builder(test: &str) -> RigBuilder {
        RigBuilder {
            test: test.to_owned(),
            raw_ip: false,
            underlay_v6: false,
            gateway_endpoint: true,
            gateway_keepalive: None,
            peer_endpoint: true,
            peer_keepalive: Some(5),
            pingable_v4: true,
            pingable_v6: true,
            unprivileged: false,
            key_file: false,
            extra_args: Vec::new(),
            rust_log: "debug".to_owned(),
            servers: Vec::new(),
            http_files: Vec::new(),
            start_gateway: true,
            tools: Vec::new(),
        }
    }

    fn setup(&mut self) {
        let mut b = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o755);
        b.create(&self.dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", self.dir.display()));
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755)).unwrap();
        for (name, body) in [
            ("udp_echo.py", UDP_ECHO_PY),
            ("tcp_echo.py", TCP_ECHO_PY),
            ("udp_client.py", UDP_CLIENT_PY),
            ("tcp_client.py", TCP_CLIENT_PY),
            ("http_get.py", HTTP_GET_PY),
        ] {
            fs::write(self.dir.join(name), body).unwrap();
        }
        self.setup_network();
        let servers = self.cfg.servers.clone();
        for s in servers {
            self.start_server(s);
        }
        if !self.cfg.raw_ip {
            self.gw_keys = Some(KeyPair::generate());
            self.peer_keys = Some(KeyPair::generate());
        }
        self.gateway_cmd = self.make_gateway_args();
        // Order matters for speed: WireGuard retries a lost handshake only after 5 s. So the
        // peer is configured first but stays quiet, then the gateway starts (and may initiate
        // to the ready peer), and only then does the peer's keepalive make it initiate too.
        if self.cfg.raw_ip {
            self.setup_raw_peer();
        } else {
            self.setup_wg_peer();
        }
        if self.cfg.start_gateway {
            self.start_gateway();
        }
        if !self.cfg.raw_ip && self.cfg.peer_endpoint && self.cfg.peer_keepalive.is_some() {
            let gw_pub = self.gateway_keys().public.clone();
            let dev = self.wg_dev.clone();
            self.wg_set_peer(&dev, &gw_pub, None, self.cfg.peer_keepalive);
        }
    }

    fn setup_network(&mut self) {
        for ns in [&self.peer, &self.gw, &self.inet] {
            let mut c = Command::new("ip");
            c.args(["netns", "add", &ns.name]);
            run_timeout(c, CMD_TIMEOUT).expect_success();
            ns.ip("link set lo up");
        }
        let (p, g, i) = (&self.peer, &self.gw, &self.inet);
        p.ip(&format!(
            "link add up0 type veth peer name peer0 netns {}",
            g.name
        ));
        g.ip(&format!(
            "link add inet0 type veth peer name gw0 netns {}",
            i.name
        ));
        // Deleting the primary address must not take the roamed (secondary) one with it.
        p.sysctl("net.ipv4.conf.up0.promote_secondaries", "1");
        for (ns, dev, v4, v6, p4, p6) in [
            (
                p,
                "up0",
                PEER_UNDERLAY_V4,
                PEER_UNDERLAY_V6,
                UNDERLAY_PREFIX_V4,
                64,
            ),
            (
                g,
                "peer0",
                GW_UNDERLAY_V4,
                GW_UNDERLAY_V6,
                UNDERLAY_PREFIX_V4,
                64,
            ),
            (g, "inet0", GW_INET_V4, GW_INET_V6, 24, 64),
            (i, "gw0", INET_V4, INET_V6, 24, 64),
        ] {
            ns.ip(&format!("addr add {v4}/{p4} dev {dev}"));
            ns.ip(&format!("addr add {v6}/{p6} dev {dev} nodad"));
            ns.ip(&format!("link set {dev} up"));
        }
        g.ip(&format!("route add default via {INET_V4}"));
        g.ip(&format!("-6 route add default via {INET_V6}"));
        g.write_etc(
            "hosts",
            &format!(
                "127.0.0.1 localhost\n::1 localhost\n{INET_V4} {INET_HOSTNAME}\n{INET_V6} {INET_HOSTNAME}\n"
            ),
        );
        g.write_etc(
            "resolv.conf",
            &format!("nameserver {INET_V4}\noptions timeout:1 attempts:1\n"),
        );
        p.write_etc(
            "resolv.conf",
            &format!("nameserver {PINGABLE_V4}\noptions timeout:1 attempts:1\n"),
        );
    }

    /// Path of `name` in the rig's temp dir, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Starts `argv` in `ns` in the background, logging to `<dir>/<name>-<n>.log`. It is
    /// stopped at cleanup.
    pub fn spawn(&mut self, ns: &Netns, name: &str, argv: &[&str]) -> ProcId {
        let mut cmd = ns.command(argv[0]);
        cmd.args(&argv[1..]);
        let log = self.dir.join(format!("{name}-{}.log", self.procs.len()));
        self.procs.push(Proc::spawn(name, cmd, &log));
        ProcId(self.procs.len() - 1)
    }

    pub fn proc(&mut self, id: ProcId) -> &mut Proc {
        &mut self.procs[id.0]
    }

    /// The first process started as server `server` (by the builder).
    pub fn server_proc(&mut self, server: Server) -> &mut Proc {
        let name = match server {
            Server::UdpEcho => "udp-echo",
            Server::TcpEcho => "tcp-echo",
            Server::Http => "http",
            Server::Iperf3 => "iperf3",
        };
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("server {server:?} not started"))
    }

    // ---- diagnostics and cleanup ------------------------------------------------------------

    /// Everything useful for a post-mortem, as text.
    pub fn diagnostics(&mut self) -> String {
        let mut s = format!(
            "===== rig {} (test {}): namespaces {} {} {}, dir {} =====\n",
            self.tag,
            self.cfg.test,
            self.peer.name,
            self.gw.name,
            self.inet.name,
            self.dir.display()
        );
        if let Some(gw) = self.gateway.as_mut() {
            let status = gw.try_status();
            s.push_str(&format!(
                "----- gateway (pid {}, exit {status:?}): {} -----\n{}",
                gw.pid(),
                gw.cmdline,
                gw.log_tail(300)
            ));
        } else {
            s.push_str("----- gateway not started -----\n");
        }
        for p in &mut self.procs {
            let status = p.try_status();
            s.push_str(&format!(
                "----- {} (pid {}, exit {status:?}) -----\n{}",
                p.name,
                p.pid(),
                p.log_tail(40)
            ));
        }
        for dev in &self.wg_devs {
            s.push_str(&format!(
                "----- wg show {dev} -----\n{}\n",
                self.peer.run(&["wg", "show", dev]).stdout
            ));
        }
        for ns in [&self.peer, &self.gw].into_iter().chain(&self.extra_ns) {
            let addrs = ns.run(&["ip", "-br", "addr"]).stdout;
            s.push_str(&format!("----- {} addresses -----\n{addrs}", ns.name));
        }
        s
    }

    fn cleanup(&mut self) {
        // SIGTERM everything at once, then give all one shared grace period.
        let procs: Vec<&mut Proc> = self
            .gateway
            .iter_mut()
            .chain(self.procs.iter_mut())
            .collect();
        for p in procs {
            p.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for p in self.gateway.iter_mut().chain(self.procs.iter_mut()) {
            p.wait_exit(deadline.saturating_duration_since(Instant::now()));
            p.stop(Duration::ZERO);
        }
        for ns in [&self.peer, &self.gw, &self.inet]
            .into_iter()
            .chain(&self.extra_ns)
        {
            ns.destroy();
        }
        for dev in &self.wg_devs {
            let _ = fs::remove_file(Path::new("/var/run/wireguard").join(format!("{dev}.sock")));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if thread::panicking() {
            let d = self.diagnostics();
            eprintln!("{d}");
        }
        if std::env::var_os("WGS_RIG_KEEP").is_some() {
            loud_line(&format!(
                "WGS_RIG_KEEP: keeping rig {} ({}, {}, {}, {}); processes are left running",
                self.tag,
                self.peer.name,
                self.gw.name,
                self.inet.name,
                self.dir.display()
            ));
            // Leave the processes running: forget their handles so Proc::drop won't stop them.
            for p in self.gateway.take().into_iter().chain(self.procs.drain(..)) {
                std::mem::forget(p);
            }
            return;
        }
        self.cleanup();
    }
}
