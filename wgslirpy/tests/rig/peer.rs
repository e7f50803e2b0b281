//! The peer side: WireGuard keys, the WireGuard peer (wireguard-go, `wg`) and the raw-IP
//! (socat) peer.

use super::*;

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

impl Rig {
    // ---- WireGuard peer ---------------------------------------------------------------------

    pub(super) fn setup_wg_peer(&mut self) {
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

    pub(super) fn setup_raw_peer(&mut self) {
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
