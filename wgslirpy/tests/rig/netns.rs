//! Network namespaces ([`Netns`]), the environment check and reaping of stale rigs.

use super::*;

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
    pub(super) fn destroy(&self) {
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
pub(super) fn environment() -> &'static Result<(), String> {
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
