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
// Generic helpers (no root needed)
// ---------------------------------------------------------------------------------------------

/// Polls `probe` every [`POLL`] until it returns `Some`, or `timeout` passes (then `None`).
/// The probe runs at least once.
pub fn wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Result of [`run_timeout`].
#[derive(Debug)]
pub struct CmdOutput {
    pub cmdline: String,
    /// `None` if the command was killed because it ran past its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Time from spawn until the exit was seen (5 ms granularity).
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// Panics (showing the whole output) unless the command exited 0.
    #[track_caller]
    pub fn expect_success(self) -> Self {
        if !self.success() {
            panic!("command failed: {self}");
        }
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "`{}` -> {s} after {:?}", self.cmdline, self.elapsed)?,
            None => write!(
                f,
                "`{}` -> timed out after {:?}",
                self.cmdline, self.elapsed
            )?,
        }
        write!(
            f,
            "\n--- stdout ---\n{}--- stderr ---\n{}--------------",
            self.stdout, self.stderr
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with stdin from /dev/null, capturing stdout and stderr; kills it after `timeout`.
/// Panics only if the program can't be spawned at all.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> CmdOutput {
    let cmdline = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{cmdline}`: {e}"));
    let (tx, rx) = mpsc::channel();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as _),
        child.stderr.take().map(|p| Box::new(p) as _),
    ];
    for (i, pipe) in pipes.into_iter().enumerate() {
        if let Some(mut pipe) = pipe {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((i, buf));
            });
        }
    }
    drop(tx);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for `{cmdline}`: {e}"),
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    // A grandchild may keep a pipe open: don't wait for it for long.
    let mut out = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok((i, buf)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out[i] = buf;
    }
    let [stdout, stderr] = out.map(|b| String::from_utf8_lossy(&b).into_owned());
    CmdOutput {
        cmdline,
        status,
        stdout,
        stderr,
        elapsed,
    }
}

/// A background process with its stdout and stderr going to a log file. Dropping it stops it
/// (SIGTERM, then SIGKILL after a grace period). Signals go by PID only while the child is
/// not yet reaped, so they can never hit a recycled PID.
pub struct Proc {
    pub name: String,
    pub cmdline: String,
    pub log_path: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null) logging to `log_path`; panics if it can't start.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let cmdline = describe(&cmd);
        let log = File::create(log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} `{cmdline}`: {e}"));
        Proc {
            name: name.to_owned(),
            cmdline,
            log_path: log_path.to_owned(),
            child,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (non-blocking).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `sig` unless the process has already been reaped. Returns whether it was sent.
    pub fn signal(&mut self, sig: i32) -> bool {
        if !self.is_alive() {
            return false;
        }
        let pid = i32::try_from(self.pid()).expect("pid fits i32");
        // SAFETY: kill(2) with a PID of our own unreaped child has no memory-safety concerns.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        if let Some(st) = self.wait_exit(grace) {
            return st;
        }
        let _ = self.child.kill();
        let st = self.child.wait().expect("wait after SIGKILL");
        self.exit = Some(st);
        st
    }

    /// The log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.stop(STOP_GRACE);
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    for l in &lines[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Socket protocol for [`bound_sockets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    /// Listening TCP sockets only.
    TcpListen,
}

/// Local addresses of the sockets process `pid` holds (read from `/proc/<pid>/fd` and the
/// process's own network namespace's `/proc/<pid>/net/{udp,udp6,tcp,tcp6}`); empty if the
/// process is gone. Needs no root for one's own processes.
pub fn bound_sockets(pid: u32, proto: Proto) -> Vec<SocketAddr> {
    let mut inodes = Vec::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    for fd in fds.flatten() {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(inode.to_owned());
            }
        }
    }
    let tables: [&str; 2] = match proto {
        Proto::Udp => ["udp", "udp6"],
        Proto::TcpListen => ["tcp", "tcp6"],
    };
    let mut out = Vec::new();
    for table in tables {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            if proto == Proto::TcpListen && f[3] != "0A" {
                continue;
            }
            if let Some(addr) = parse_proc_net_addr(f[1]) {
                out.push(addr);
            }
        }
    }
    out
}

fn parse_proc_net_addr(s: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = s.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes);
    let ip: IpAddr = match ip_hex.len() {
        8 => Ipv4Addr::from(word(0).ok()?).into(),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i).ok()?);
            }
            Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether process `pid` has handlers installed for all of `signals` (`SigCgt` in
/// `/proc/<pid>/status`).
pub fn signals_caught(pid: u32, signals: &[i32]) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let Some(mask) = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
    else {
        return false;
    };
    signals.iter().all(|&s| mask & (1u64 << (s - 1)) != 0)
}

/// A field of `/proc/<pid>/status`, e.g. `Uid` or `CapEff` (trimmed), if the process exists.
pub fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Says loudly that `test` is skipped; under `CI=true` panics instead.
fn skip_or_fail(test: &str, reason: &str) {
    if ci_strict() {
        panic!(
            "end-to-end test {test} cannot run with CI=true: needs root and ip netns ({reason})"
        );
    }
    loud_line(&format!(
        "SKIPPING end-to-end test {test}: needs root and ip netns ({reason})"
    ));
}

fn ci_strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Writes one line straight to the process's stderr, bypassing libtest's output capture.
pub fn loud_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The python interpreter the rig uses.
pub fn python() -> &'static str {
    static PY: OnceLock<&'static str> = OnceLock::new();
    PY.get_or_init(|| {
        PYTHON_CANDIDATES
            .into_iter()
            .find(|p| which(p).is_some())
            .unwrap_or("python3")
    })
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

/// A network namespace made by the rig (`ip netns`).
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns exec <ns> <program>`: add arguments and run it. As `ip netns exec` execs the
    /// program, a spawned child's PID is the program's own.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `argv` in the namespace with the default timeout.
    pub fn run(&self, argv: &[&str]) -> CmdOutput {
        self.run_timeout(argv, CMD_TIMEOUT)
    }

    pub fn run_timeout(&self, argv: &[&str], timeout: Duration) -> CmdOutput {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        run_timeout(c, timeout)
    }

    /// Runs `argv` in the namespace; panics unless it succeeds; returns stdout.
    #[track_caller]
    pub fn ok(&self, argv: &[&str]) -> String {
        self.run(argv).expect_success().stdout
    }

    /// `ip -n <ns> <args>` (args split on whitespace); panics unless it succeeds; returns stdout.
    #[track_caller]
    pub fn ip(&self, args: &str) -> String {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args.split_whitespace());
        run_timeout(c, CMD_TIMEOUT).expect_success().stdout
    }

    /// `sysctl -qw key=value` inside the namespace.
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        self.ok(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    fn pids(&self) -> Vec<i32> {
        let mut c = Command::new("ip");
        c.args(["netns", "pids", &self.name]);
        run_timeout(c, CMD_TIMEOUT)
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }

    /// Writes `/etc/netns/<ns>/<file>`, which `ip netns exec` bind-mounts over `/etc/<file>`.
    pub fn write_etc(&self, file: &str, contents: &str) {
        let dir = self.etc_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        fs::write(dir.join(file), contents).expect("write /etc/netns file");
    }

    /// Kills what is left inside (by PID) and deletes the namespace and its `/etc/netns` dir.
    fn destroy(&self) {
        for pid in self.pids() {
            // SAFETY: plain kill(2) on a PID listed as inside our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut c = Command::new("ip");
        c.args(["netns", "delete", &self.name]);
        let _ = run_timeout(c, CMD_TIMEOUT);
        let _ = fs::remove_dir_all(self.etc_dir());
    }
}

// ---------------------------------------------------------------------------------------------
// Environment check and stale-state reaping
// ---------------------------------------------------------------------------------------------

const REQUIRED_TOOLS: [&str; 7] = [
    "ip",
    "wireguard-go",
    "wg",
    "ping",
    "socat",
    "setpriv",
    "sysctl",
];

/// Checks once per process whether end-to-end tests can run here; `Err` has the reason.
fn environment() -> &'static Result<(), String> {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    CHECK.get_or_init(|| {
        // SAFETY: geteuid(2) cannot fail and has no side effects.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let mut missing: Vec<&str> = REQUIRED_TOOLS
            .into_iter()
            .filter(|t| which(t).is_none())
            .collect();
        if which(python()).is_none() {
            missing.push("python3");
        }
        if !missing.is_empty() {
            return Err(format!("missing tools: {}", missing.join(", ")));
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        reap_stale();
        // Doubles as the one-time setup of /run/netns, so that parallel rigs don't race it.
        let probe = Netns {
            name: format!("wgs-{}-probe", std::process::id()),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "add", &probe.name]);
        let out = run_timeout(c, CMD_TIMEOUT);
        if !out.success() {
            return Err(format!("`ip netns add` failed: {}", out.stderr.trim()));
        }
        probe.destroy();
        Ok(())
    })
}

/// Removes namespaces, WireGuard sockets and temp dirs left by rig processes that no longer
/// exist (e.g. a test binary killed with SIGKILL).
fn reap_stale() {
    let dead = |pid: &str| pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists();
    let mut c = Command::new("ip");
    c.args(["netns", "list"]);
    for line in run_timeout(c, CMD_TIMEOUT).stdout.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() == Some("wgs") && parts.next().is_some_and(dead) {
            Netns {
                name: name.to_owned(),
            }
            .destroy();
        }
    }
    if let Ok(entries) = fs::read_dir("/var/run/wireguard") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n.strip_prefix("wg").and_then(|r| r.split('-').next())
                && n.ends_with(".sock")
                && dead(pid)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n.strip_prefix("wgs-rig-").and_then(|r| r.split('-').next())
                && dead(pid)
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// A WireGuard key pair (base64), generated with `wg genkey` / `wg pubkey`.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let mut genkey = Command::new("wg");
        genkey.arg("genkey");
        let private = run_timeout(genkey, CMD_TIMEOUT)
            .expect_success()
            .stdout
            .trim()
            .to_owned();
        let public = pubkey_of(&private);
        KeyPair { private, public }
    }
}

/// `wg pubkey` of a base64 private key.
pub fn pubkey_of(private: &str) -> String {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wg pubkey");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .expect("write to wg pubkey");
    let out = child.wait_with_output().expect("wait for wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

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

const UDP_ECHO_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    print(host, addr[1], len(data), flush=True)
    s.sendto(data, addr)
"#;

const TCP_ECHO_PY: &str = r#"
import socket, socketserver, sys
class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        host = self.client_address[0]
        host = host[7:] if host.startswith("::ffff:") else host
        total = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            total += len(data)
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)
        print(host, self.client_address[1], total, flush=True)
Server(("::", int(sys.argv[1])), Echo).serve_forever()
"#;

/// argv: host port payload_hex attempts per_attempt_timeout_secs [source_ip]. Prints `reply
/// <host> <port> <hex>` and exits 0, or exits 1 after all attempts time out.
const UDP_CLIENT_PY: &str = r#"
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
attempts, timeout = int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 6:
    s.bind((sys.argv[6], 0))
s.settimeout(timeout)
for i in range(attempts):
    s.sendto(payload, (host, port))
    try:
        data, addr = s.recvfrom(65535)
        print("reply", addr[0], addr[1], data.hex(), flush=True)
        sys.exit(0)
    except socket.timeout:
        print("attempt", i + 1, "timed out", file=sys.stderr, flush=True)
sys.exit(1)
"#;

/// argv: url timeout_secs. Prints `status <code>` then `body <hex>`.
const HTTP_GET_PY: &str = r#"
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print("status", code, flush=True)
print("body", body.hex(), flush=True)
"#;

/// argv: host port payload_hex timeout_secs. Sends, half-closes, prints `reply <hex>` of
/// everything read until EOF.
const TCP_CLIENT_PY: &str = r#"
import socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=timeout)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
print("reply", got.hex(), flush=True)
"#;

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

    fn start_server(&mut self, server: Server) {
        let inet = self.inet.clone();
        let py = python();
        let (name, proto, port) = match server {
            Server::UdpEcho => ("udp-echo", Proto::Udp, UDP_ECHO_PORT),
            Server::TcpEcho => ("tcp-echo", Proto::TcpListen, TCP_ECHO_PORT),
            Server::Http => ("http", Proto::TcpListen, HTTP_PORT),
            Server::Iperf3 => ("iperf3", Proto::TcpListen, IPERF3_PORT),
        };
        let port_s = port.to_string();
        let (udp_script, tcp_script) = (self.path("udp_echo.py"), self.path("tcp_echo.py"));
        let root = self.dir.join("www");
        let root_s = root.to_string_lossy().into_owned();
        let argv: Vec<&str> = match server {
            Server::UdpEcho => vec![py, &udp_script, &port_s],
            Server::TcpEcho => vec![py, &tcp_script, &port_s],
            Server::Http => {
                fs::create_dir_all(&root).unwrap();
                for (file, body) in &self.cfg.http_files {
                    fs::write(root.join(file), body).unwrap();
                }
                let dir = ["--bind", "::", "--directory", &root_s];
                [py, "-m", "http.server", &port_s]
                    .into_iter()
                    .chain(dir)
                    .collect()
            }
            Server::Iperf3 => vec!["iperf3", "-s", "-p", &port_s],
        };
        let id = self.spawn(&inet, name, &argv);
        self.wait_listening(id, proto, port);
    }

    /// Waits until process `id` has a socket on `port` (panics, showing its log, otherwise).
    #[track_caller]
    pub fn wait_listening(&mut self, id: ProcId, proto: Proto, port: u16) {
        let ok = wait_until(Duration::from_secs(10), || {
            let p = &mut self.procs[id.0];
            if !p.is_alive() {
                return Some(false);
            }
            bound_sockets(p.pid(), proto)
                .iter()
                .any(|a| a.port() == port)
                .then_some(true)
        });
        if ok != Some(true) {
            let p = &self.procs[id.0];
            panic!(
                "{} never listened on {proto:?} port {port}\n{}",
                p.name,
                p.log_tail(50)
            );
        }
    }

    fn make_gateway_args(&self) -> Vec<String> {
        let c = &self.cfg;
        let (gw_ip, peer_ip): (IpAddr, IpAddr) = if c.underlay_v6 {
            (GW_UNDERLAY_V6.into(), PEER_UNDERLAY_V6.into())
        } else {
            (GW_UNDERLAY_V4.into(), PEER_UNDERLAY_V4.into())
        };
        let mut a: Vec<String> = Vec::new();
        if c.raw_ip {
            a.extend(["-k", "INSECURE", "-K", "GUE"].map(String::from));
        } else {
            let gw = self.gw_keys.as_ref().unwrap();
            if c.key_file {
                let path = self.dir.join("gateway.key");
                fs::write(&path, format!("{}\n", gw.private)).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
                if c.unprivileged {
                    chown(&path, Some(65534), Some(65534)).unwrap();
                }
                a.extend(["-f".into(), path.to_string_lossy().into_owned()]);
            } else {
                a.extend(["-k".into(), gw.private.clone()]);
            }
            a.extend(["-K".into(), self.peer_keys.as_ref().unwrap().public.clone()]);
        }
        a.extend(["-b".into(), SocketAddr::new(gw_ip, GW_PORT).to_string()]);
        if c.gateway_endpoint {
            a.extend(["-p".into(), SocketAddr::new(peer_ip, PEER_PORT).to_string()]);
        }
        if let Some(k) = c.gateway_keepalive {
            a.extend(["-a".into(), k.to_string()]);
        }
        if c.pingable_v4 {
            a.extend(["-P".into(), PINGABLE_V4.to_string()]);
        }
        if c.pingable_v6 {
            a.extend(["-P".into(), PINGABLE_V6.to_string()]);
        }
        a.extend(c.extra_args.iter().cloned());
        a
    }

    /// The gateway's arguments (without the program).
    pub fn gateway_args(&self) -> &[String] {
        &self.gateway_cmd
    }

    /// Replaces the gateway's arguments for the next [`Self::start_gateway`].
    pub fn set_gateway_args(&mut self, args: Vec<String>) {
        self.gateway_cmd = args;
    }

    /// Path of the binary under test: `$WGS_RIG_BINARY` if set (to run the suite against
    /// another build), else the one cargo built for this test.
    pub fn binary() -> String {
        std::env::var("WGS_RIG_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wgslirpy").into())
    }

    /// Starts `wgslirpy` in the gateway ns and waits until it holds a UDP socket on
    /// [`GW_PORT`]; panics with its log if it exits or doesn't bind within 10 s.
    pub fn start_gateway(&mut self) {
        assert!(
            self.gateway.as_mut().is_none_or(|g| !g.is_alive()),
            "gateway already running"
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.gw.name]);
        let bin = if self.cfg.unprivileged {
            let copy = self.dir.join("wgslirpy");
            if !copy.exists() {
                fs::copy(Self::binary(), &copy).expect("copy the binary");
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
            }
            cmd.args([
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]);
            copy
        } else {
            PathBuf::from(Self::binary())
        };
        cmd.arg(bin)
            .args(&self.gateway_cmd)
            .env("RUST_LOG", &self.cfg.rust_log)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1");
        let restarts = usize::from(self.gateway.is_some());
        let log = self.dir.join(format!("gateway{restarts}.log"));
        let gw = self.gateway.insert(Proc::spawn("gateway", cmd, &log));
        let pid = gw.pid();
        let bound = wait_until(Duration::from_secs(10), || {
            if !gw.is_alive() {
                return Some(false);
            }
            bound_sockets(pid, Proto::Udp)
                .iter()
                .any(|a| a.port() == GW_PORT)
                .then_some(true)
        });
        match bound {
            Some(true) => {}
            Some(false) => panic!(
                "gateway exited at startup with {:?}: `{}`\n{}",
                gw.try_status(),
                gw.cmdline,
                gw.log_tail(100)
            ),
            None => panic!(
                "gateway did not bind UDP port {GW_PORT} within 10 s: `{}`\n{}",
                gw.cmdline,
                gw.log_tail(100)
            ),
        }
    }

    /// The gateway process (panics if it was never started).
    pub fn gateway(&mut self) -> &mut Proc {
        self.gateway.as_mut().expect("gateway not started")
    }

    pub fn gateway_alive(&mut self) -> bool {
        self.gateway.as_mut().is_some_and(Proc::is_alive)
    }

    pub fn gateway_log(&self) -> String {
        self.gateway.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Sends `sig` to the gateway and waits up to `timeout` for it to exit.
    pub fn stop_gateway(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        let gw = self.gateway();
        gw.signal(sig);
        gw.wait_exit(timeout)
    }

    pub fn gateway_keys(&self) -> &KeyPair {
        self.gw_keys.as_ref().expect("no keys in raw-IP mode")
    }

    pub fn peer_keys(&self) -> &KeyPair {
        self.peer_keys.as_ref().expect("no keys in raw-IP mode")
    }

    /// Where the peer reaches the gateway.
    pub fn gateway_endpoint(&self) -> SocketAddr {
        if self.cfg.underlay_v6 {
            SocketAddr::new(GW_UNDERLAY_V6.into(), GW_PORT)
        } else {
            SocketAddr::new(GW_UNDERLAY_V4.into(), GW_PORT)
        }
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

    // ---- WireGuard peer ---------------------------------------------------------------------

    fn setup_wg_peer(&mut self) {
        let peer = self.peer.clone();
        let dev = self.wg_dev.clone();
        let keys = self.peer_keys.clone().unwrap();
        self.start_wg_device(&dev, &keys, PEER_PORT);
        peer.ip(&format!("addr add {PEER_INNER_V4}/32 dev {dev}"));
        peer.ip(&format!("addr add {PEER_INNER_V6}/128 dev {dev} nodad"));
        peer.ip(&format!("link set {dev} mtu {TUNNEL_MTU} up"));
        peer.ip(&format!("route add default dev {dev}"));
        peer.ip(&format!("-6 route add default dev {dev}"));
        // No keepalive yet: with one, wireguard-go would initiate at once (see `setup`).
        let endpoint = self.cfg.peer_endpoint.then(|| self.gateway_endpoint());
        let gw_pub = self.gateway_keys().public.clone();
        self.wg_set_peer(&dev, &gw_pub, endpoint, None);
    }

    /// Starts `wireguard-go -f <dev>` in the peer ns with `keys` and `listen_port`, and waits
    /// for its control socket. The device is left down and without peers.
    pub fn start_wg_device(&mut self, dev: &str, keys: &KeyPair, listen_port: u16) {
        let peer = self.peer.clone();
        self.start_wireguard_go(&peer, dev);
        let key_path = self.dir.join(format!("{dev}.key"));
        fs::write(&key_path, format!("{}\n", keys.private)).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        let key_path = key_path.to_string_lossy().into_owned();
        let port = listen_port.to_string();
        self.peer.ok(&[
            "wg",
            "set",
            dev,
            "private-key",
            &key_path,
            "listen-port",
            &port,
        ]);
    }

    /// Starts `wireguard-go -f <dev>` in `ns` and waits for its control socket. The device
    /// is left down, without key or peers (configure it with `wg`). Stopped at cleanup.
    pub fn start_wireguard_go(&mut self, ns: &Netns, dev: &str) {
        assert!(dev.len() <= 15, "interface name {dev} too long");
        let mut cmd = ns.command("wireguard-go");
        cmd.args(["-f", dev])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "verbose");
        let log = self.dir.join(format!("wireguard-go-{dev}.log"));
        self.procs
            .push(Proc::spawn(&format!("wireguard-go {dev}"), cmd, &log));
        self.wg_devs.push(dev.to_owned());
        let sock = Path::new("/var/run/wireguard").join(format!("{dev}.sock"));
        let idx = self.procs.len() - 1;
        let p = &mut self.procs[idx];
        if wait_until(Duration::from_secs(10), || sock.exists().then_some(())).is_none() {
            panic!(
                "wireguard-go {dev} made no control socket (alive: {})\n{}",
                p.is_alive(),
                p.log_tail(30)
            );
        }
    }

    /// Adds a second peer namespace (`wgs-<tag>-peer2`), linked to the gateway ns by its own
    /// veth pair (see the address plan), with routes to the gateway's underlay addresses so
    /// that the gateway's usual endpoint works from it too. It is deleted at cleanup.
    pub fn add_peer_netns(&mut self) -> Netns {
        let ns = Netns {
            name: format!("wgs-{}-peer2", self.tag),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "add", &ns.name]);
        run_timeout(c, CMD_TIMEOUT).expect_success();
        self.extra_ns.push(ns.clone());
        ns.ip("link set lo up");
        ns.ip(&format!(
            "link add up0 type veth peer name peer1 netns {}",
            self.gw.name
        ));
        for (side, dev, v4, v6) in [
            (&ns, "up0", PEER2_UNDERLAY_V4, PEER2_UNDERLAY_V6),
            (&self.gw, "peer1", GW_PEER2_SIDE_V4, GW_PEER2_SIDE_V6),
        ] {
            side.ip(&format!("addr add {v4}/24 dev {dev}"));
            side.ip(&format!("addr add {v6}/64 dev {dev} nodad"));
            side.ip(&format!("link set {dev} up"));
        }
        ns.ip(&format!(
            "route add {GW_UNDERLAY_V4}/32 via {GW_PEER2_SIDE_V4}"
        ));
        ns.ip(&format!(
            "-6 route add {GW_UNDERLAY_V6}/128 via {GW_PEER2_SIDE_V6}"
        ));
        ns
    }

    /// `wg set <dev> peer <pubkey> allowed-ips 0.0.0.0/0,::/0 [endpoint ..] [persistent-keepalive ..]`
    /// in the peer ns.
    pub fn wg_set_peer(
        &self,
        dev: &str,
        peer_pub: &str,
        endpoint: Option<SocketAddr>,
        keepalive: Option<u32>,
    ) {
        let mut argv: Vec<String> = ["wg", "set", dev, "peer", peer_pub, "allowed-ips"]
            .map(String::from)
            .into();
        argv.push("0.0.0.0/0,::/0".into());
        if let Some(e) = endpoint {
            argv.extend(["endpoint".into(), e.to_string()]);
        }
        if let Some(k) = keepalive {
            argv.extend(["persistent-keepalive".into(), k.to_string()]);
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.peer.ok(&argv);
    }

    /// Adds another WireGuard device in the peer ns (named `wg<tag><suffix>`) with a fresh key,
    /// aimed at the gateway's endpoint with peer key `gateway_pub`, a 1 s persistent keepalive
    /// (so it initiates at once), but no addresses or routes. Returns its name and keys.
    pub fn add_extra_wg_peer(
        &mut self,
        suffix: &str,
        listen_port: u16,
        gateway_pub: &str,
    ) -> (String, KeyPair) {
        let dev = format!("wg{}{suffix}", self.tag);
        let keys = KeyPair::generate();
        self.start_wg_device(&dev, &keys, listen_port);
        self.peer.ip(&format!("link set {dev} up"));
        self.wg_set_peer(&dev, gateway_pub, Some(self.gateway_endpoint()), Some(1));
        (dev, keys)
    }

    /// `wg show <dev> <what>` in the peer ns.
    pub fn wg_show(&self, dev: &str, what: &str) -> String {
        self.peer.ok(&["wg", "show", dev, what])
    }

    /// Parsed `wg show <dev> latest-handshakes`: (peer public key, unix time or 0).
    pub fn latest_handshakes(&self, dev: &str) -> Vec<(String, u64)> {
        parse_key_columns(&self.wg_show(dev, "latest-handshakes"))
            .into_iter()
            .map(|(k, v)| (k, v.first().copied().unwrap_or(0)))
            .collect()
    }

    /// Parsed `wg show <dev> transfer`: (peer public key, received bytes, sent bytes).
    pub fn transfer(&self, dev: &str) -> Vec<(String, u64, u64)> {
        parse_key_columns(&self.wg_show(dev, "transfer"))
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.first().copied().unwrap_or(0),
                    v.get(1).copied().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Latest handshake time of the main peer device with the gateway (0 = never).
    pub fn latest_handshake(&self) -> u64 {
        let gw = &self.gateway_keys().public;
        self.latest_handshakes(&self.wg_dev)
            .into_iter()
            .find(|(k, _)| k == gw)
            .map_or(0, |(_, t)| t)
    }

    /// Waits until the peer reports a handshake with the gateway; panics after `timeout`.
    /// Returns how long it took.
    #[track_caller]
    pub fn wait_handshake(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        if wait_until(timeout, || (self.latest_handshake() != 0).then_some(())).is_none() {
            panic!(
                "no WireGuard handshake within {timeout:?}\n{}",
                self.peer.run(&["wg", "show", &self.wg_dev])
            );
        }
        start.elapsed()
    }

    // ---- raw-IP peer ------------------------------------------------------------------------

    fn setup_raw_peer(&mut self) {
        let (remote, bind) = if self.cfg.underlay_v6 {
            (
                format!("UDP6-SENDTO:[{GW_UNDERLAY_V6}]:{GW_PORT}"),
                format!("bind=[::]:{PEER_PORT}"),
            )
        } else {
            (
                format!("UDP4-SENDTO:{GW_UNDERLAY_V4}:{GW_PORT}"),
                format!("bind=0.0.0.0:{PEER_PORT}"),
            )
        };
        let tun = format!("TUN:{PEER_INNER_V4}/24,tun-type=tun,iff-no-pi,iff-up,tun-name=raw0");
        let udp = format!("{remote},{bind}");
        let peer = self.peer.clone();
        let id = self.spawn(&peer, "socat", &["socat", "-d", "-d", &tun, &udp]);
        let up = wait_until(Duration::from_secs(10), || {
            if !self.procs[id.0].is_alive() {
                return Some(false);
            }
            peer.run(&["ip", "link", "show", "raw0"])
                .success()
                .then_some(true)
        });
        if up != Some(true) {
            panic!(
                "socat made no raw0 device\n{}",
                self.procs[id.0].log_tail(30)
            );
        }
        peer.ip(&format!("link set raw0 mtu {TUNNEL_MTU} up"));
        peer.ip(&format!("addr add {PEER_INNER_V6}/64 dev raw0 nodad"));
        peer.ip("route add default dev raw0");
        peer.ip("-6 route add default dev raw0");
    }

    // ---- actions ----------------------------------------------------------------------------

    /// Moves the peer's IPv4 underlay address to `new` (same /24): adds it, deletes the old
    /// one (the port stays). In WireGuard mode it then re-sets the gateway endpoint on the
    /// device so that wireguard-go drops its cached source address (v0.0.20220316 retries
    /// with a fresh source only on EINVAL, but a vanished source address yields ENETUNREACH).
    /// In raw-IP mode socat's socket is bound to the wildcard address and just follows.
    pub fn roam_peer_v4(&mut self, new: Ipv4Addr) {
        let old = self.peer_underlay_v4;
        self.peer
            .ip(&format!("addr add {new}/{UNDERLAY_PREFIX_V4} dev up0"));
        self.peer
            .ip(&format!("addr del {old}/{UNDERLAY_PREFIX_V4} dev up0"));
        self.peer_underlay_v4 = new;
        if !self.cfg.raw_ip {
            let gw_pub = self.gateway_keys().public.clone();
            self.wg_set_peer(&self.wg_dev, &gw_pub, Some(self.gateway_endpoint()), None);
        }
    }

    /// `ping` from `from` to `addr`: `count` replies wanted, 0.2 s apart, giving up after
    /// 10 s (ping's `-w`), so early losses are made up by more requests.
    pub fn ping(&self, from: &Netns, addr: IpAddr, count: u32) -> PingResult {
        let fam = if addr.is_ipv4() { "-4" } else { "-6" };
        let (c, a) = (count.to_string(), addr.to_string());
        let argv = [
            "ping", fam, "-n", "-c", &c, "-i", "0.2", "-W", "2", "-w", "10", &a,
        ];
        let output = from.run_timeout(&argv, Duration::from_secs(15));
        let num_before = |word: &str| -> u32 {
            output
                .stdout
                .lines()
                .find(|l| l.contains("transmitted"))
                .and_then(|l| {
                    l.split(',').find_map(|part| {
                        let part = part.trim();
                        part.strip_suffix(word).and_then(|n| n.trim().parse().ok())
                    })
                })
                .unwrap_or(0)
        };
        PingResult {
            transmitted: num_before("packets transmitted"),
            received: num_before("received"),
            output,
        }
    }

    /// Pings `addr` from the peer ns; panics unless `count` replies came.
    #[track_caller]
    pub fn assert_ping(&self, addr: IpAddr, count: u32) -> PingResult {
        let r = self.ping(&self.peer, addr, count);
        assert!(
            r.received >= count && r.output.success(),
            "ping {addr}: {} of {} answered, wanted {count}\n{}",
            r.received,
            r.transmitted,
            r.output
        );
        r
    }

    /// Sends `payload` (≤ 60000 bytes) by UDP from `from` to `dst` and returns the first
    /// datagram that comes back, trying `attempts` times with `per_attempt` timeout each.
    pub fn udp_roundtrip(
        &self,
        from: &Netns,
        dst: SocketAddr,
        payload: &[u8],
        attempts: u32,
        per_attempt: Duration,
    ) -> Result<UdpReply, CmdOutput> {
        self.udp_roundtrip_from(from, None, dst, payload, attempts, per_attempt)
    }

    /// [`Rig::udp_roundtrip`] from a socket bound to `source` (any local address if `None`).
    pub fn udp_roundtrip_from(
        &self,
        from: &Netns,
        source: Option<IpAddr>,
        dst: SocketAddr,
        payload: &[u8],
        attempts: u32,
        per_attempt: Duration,
    ) -> Result<UdpReply, CmdOutput> {
        assert!(payload.len() <= 60000, "payload too large for argv");
        let script = self.path("udp_client.py");
        let (host, port, hx) = (dst.ip().to_string(), dst.port().to_string(), hex(payload));
        let (n, t) = (attempts.to_string(), per_attempt.as_secs_f64().to_string());
        let source = source.map(|s| s.to_string());
        let mut argv = vec![python(), &script, &host, &port, &hx, &n, &t];
        argv.extend(source.as_deref());
        let out = from.run_timeout(&argv, per_attempt * attempts + Duration::from_secs(5));
        if !out.success() {
            return Err(out);
        }
        let parsed = out.stdout.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || f[0] != "reply" {
                return None;
            }
            let ip: IpAddr = f[1].split('%').next()?.parse().ok()?;
            Some(UdpReply {
                from: SocketAddr::new(ip, f[2].parse().ok()?),
                payload: unhex(f[3])?,
            })
        });
        parsed.ok_or(out)
    }

    /// Connects by TCP from `from` to `dst`, sends `payload`, half-closes and returns all
    /// that came back until EOF.
    pub fn tcp_roundtrip(
        &self,
        from: &Netns,
        dst: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CmdOutput> {
        assert!(payload.len() <= 60000, "payload too large for argv");
        let script = self.path("tcp_client.py");
        let (host, port, hx) = (dst.ip().to_string(), dst.port().to_string(), hex(payload));
        let t = timeout.as_secs_f64().to_string();
        let argv = [python(), &script, &host, &port, &hx, &t];
        let out = from.run_timeout(&argv, timeout + Duration::from_secs(5));
        if !out.success() {
            return Err(out);
        }
        let parsed = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("reply ").and_then(|h| unhex(h.trim())));
        parsed.ok_or(out)
    }

    /// HTTP GET of `url` from `from` (python's urllib; no proxy settings are inherited).
    /// Returns the status code and body.
    pub fn http_get(
        &self,
        from: &Netns,
        url: &str,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), CmdOutput> {
        let script = self.path("http_get.py");
        let t = timeout.as_secs_f64().to_string();
        let mut cmd = from.command(python());
        cmd.args([script.as_str(), url, &t]);
        for var in [
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        let out = run_timeout(cmd, timeout + Duration::from_secs(5));
        if !out.success() {
            return Err(out);
        }
        let status = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("status ")?.trim().parse().ok());
        let body = out
            .stdout
            .lines()
            .find_map(|l| unhex(l.strip_prefix("body ")?.trim()));
        match (status, body) {
            (Some(s), Some(b)) => Ok((s, b)),
            _ => Err(out),
        }
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

/// Parses `wg show <dev> <field>` output: `<key>\t<n>[\t<n>...]` lines.
fn parse_key_columns(text: &str) -> Vec<(String, Vec<u64>)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let key = f.next()?.to_owned();
            Some((key, f.filter_map(|n| n.parse().ok()).collect()))
        })
        .collect()
}
