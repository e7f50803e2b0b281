//! Generic helpers usable without root: running commands with a timeout, polling,
//! background processes ([`Proc`]), `/proc` inspection and small text utilities.

use super::*;

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
pub(super) fn skip_or_fail(test: &str, reason: &str) {
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

pub(super) fn which(program: &str) -> Option<PathBuf> {
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

pub(super) fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}
