//! Control of the gateway under test: its arguments, start, stop, log and keys.

use super::*;

impl Rig {
    pub(super) fn make_gateway_args(&self) -> Vec<String> {
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
}
