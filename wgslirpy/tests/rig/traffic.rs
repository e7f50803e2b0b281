//! Actions through the tunnel: roaming, ping, UDP/TCP round trips and HTTP GET.

use super::*;

impl Rig {
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
}
