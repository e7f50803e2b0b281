//! Validated settings.
//!
//! Everything a gateway needs to start is described by [`Config`]. The CLI
//! and config files ([`crate::config_file`]) parse user text into these
//! types through the `FromStr` impls here, so both report the same errors. A `Config` that
//! exists is well-formed: keys decode, addresses parse, limits are in range.
//! Whether a port can actually be bound is only known when [`crate::run`]
//! tries it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// A 32-byte Curve25519 key, as WireGuard writes it: 44 characters of base64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Decodes a base64 key. Surrounding whitespace (a trailing newline from
    /// `wg genkey > file`) is ignored.
    pub fn from_base64(text: &str) -> Result<Self, ConfigError> {
        let trimmed = text.trim();
        let bytes = BASE64
            .decode(trimmed)
            .map_err(|_| ConfigError::InvalidKey("it is not valid base64".into()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            ConfigError::InvalidKey(format!("it decodes to {} bytes, not 32", bytes.len()))
        })?;
        Ok(Key(bytes))
    }

    /// The key in WireGuard's base64 form.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// A new random private key, clamped as `wg genkey` clamps it.
    pub fn generate_private() -> Self {
        let mut bytes: [u8; 32] = rand::random();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Key(bytes)
    }

    /// The public key of this private key, as `wg pubkey` computes it.
    pub fn public_key(&self) -> Self {
        let secret = gotatun::x25519::StaticSecret::from(self.0);
        Key(gotatun::x25519::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for Key {
    /// Never prints the key itself: it may be a private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// How packets reach the peers.
#[derive(Clone, Debug)]
pub enum Transport {
    /// WireGuard: our static private key, and the peers we accept.
    WireGuard {
        /// This node's private key.
        private_key: Key,
        /// The peers. The CLI configures one; the transport handles several.
        peers: Vec<PeerConfig>,
    },
    /// Plain IPv4/IPv6 packets in UDP datagrams (Linux GUE variant 1), with
    /// no authentication at all (`-k INSECURE -K GUE`).
    RawIp {
        /// When set, only datagrams from this address are accepted, and
        /// replies always go there. Otherwise replies go to the newest sender.
        peer_endpoint: Option<SocketAddr>,
    },
}

/// One WireGuard peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's public key.
    pub public_key: Key,
    /// Optional symmetric key mixed into every handshake with this peer
    /// (`PresharedKey` in a config file), for post-quantum resistance.
    pub preshared_key: Option<Key>,
    /// Where to send handshakes before the peer has spoken. Roaming replaces
    /// it with the source of the newest authenticated packet.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive interval, in seconds.
    pub keepalive: Option<u16>,
    /// Inner addresses this peer may use as source, and that are routed to it.
    pub allowed_ips: Vec<ipnetwork::IpNetwork>,
}

impl PeerConfig {
    /// A peer with only its key and allowed IPs: no preshared key, no
    /// endpoint (it is learnt from the peer's first packet), no keepalive.
    pub fn new(public_key: Key, allowed_ips: Vec<ipnetwork::IpNetwork>) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            keepalive: None,
            allowed_ips,
        }
    }

    /// The allowed IPs of a peer configured without any: everything, v4 and v6.
    pub fn allow_all() -> Vec<ipnetwork::IpNetwork> {
        vec![
            "0.0.0.0/0".parse().expect("valid literal"),
            "::/0".parse().expect("valid literal"),
        ]
    }
}

/// A reverse forward, `HOST,SOURCE,DEST` (`-t` and `-u`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    /// Host socket address to listen on.
    pub host: SocketAddr,
    /// Source address the peer sees; `None` means the host-side client's own.
    pub source: Option<SocketAddr>,
    /// Address inside the tunnel to reach.
    pub dest: SocketAddr,
}

impl FromStr for Forward {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::InvalidForward {
            text: text.to_owned(),
            why,
        };
        let parts: Vec<&str> = text.split(',').collect();
        let [host, source, dest] = parts[..] else {
            return Err(bad(format!(
                "expected HOST,SOURCE,DEST (SOURCE may be empty), found {} part(s)",
                parts.len()
            )));
        };
        let address = |name: &str, part: &str| {
            part.trim().parse::<SocketAddr>().map_err(|_| {
                bad(format!(
                    "{name} `{part}` is not an address:port (IPv6 as [addr]:port)"
                ))
            })
        };
        let host = address("HOST", host)?;
        let source = match source.trim() {
            "" => None,
            s => Some(address("SOURCE", s)?),
        };
        let dest = address("DEST", dest)?;
        if let Some(source) = source
            && source.is_ipv4() != dest.is_ipv4()
        {
            return Err(bad("SOURCE and DEST must be the same IP version".into()));
        }
        if dest.port() == 0 {
            return Err(bad("DEST port must not be 0".into()));
        }
        Ok(Forward { host, source, dest })
    }
}

/// Everything a gateway needs. Build it with the CLI or by hand.
#[derive(Clone, Debug)]
pub struct Config {
    /// How packets reach the peers.
    pub transport: Transport,
    /// Local UDP address of the tunnel socket (`-b`).
    pub bind: SocketAddr,
    /// Tunnel MTU: the largest IP packet sent to a peer (`--mtu`).
    pub mtu: u16,
    /// Addresses inside the tunnel that answer pings themselves (`-P`).
    pub pingable: Vec<IpAddr>,
    /// Address inside the tunnel of the DNS server (`-D`).
    pub dns: Option<SocketAddr>,
    /// A DNS query not answered within this time gets SERVFAIL
    /// (`--dns-timeout`).
    pub dns_timeout: Duration,
    /// Most DNS queries of one peer waiting for the resolver or a
    /// nameserver at once; more get SERVFAIL (`--max-dns-queries`). Per
    /// peer, like every flow limit: the gateway as a whole holds at most
    /// peers × this many.
    pub max_dns_queries: usize,
    /// Threads that may block in the host resolver (getaddrinfo) at once
    /// (`--resolver-threads`).
    pub resolver_threads: usize,
    /// Per-connection TCP buffering bound, in bytes (`--tcp-buffer-size`).
    pub tcp_buffer_size: usize,
    /// Packets that may wait for the tunnel before new ones are dropped
    /// (`--transmit-queue-capacity`).
    pub transmit_queue_capacity: usize,
    /// Kernel buffer asked for on the tunnel's UDP socket, each way, in
    /// bytes (`--tunnel-socket-buffer`); without `CAP_NET_ADMIN` the kernel
    /// caps it at `net.core.rmem_max` / `wmem_max`.
    pub tunnel_socket_buffer: usize,
    /// Reverse UDP forwards (`-u`).
    pub incoming_udp: Vec<Forward>,
    /// Reverse TCP forwards (`-t`).
    pub incoming_tcp: Vec<Forward>,
    /// Most UDP flows of one peer at once; that peer's least recently used
    /// goes first, never another peer's (`--max-udp-flows`). Per peer: the
    /// gateway holds at most peers × this many.
    pub max_udp_flows: usize,
    /// A UDP flow with no traffic either way for this long is closed.
    pub udp_idle_timeout: Duration,
    /// Most TCP connections of one peer at once; its new ones beyond it get
    /// RST (`--max-tcp-connections`). Per peer: the gateway holds at most
    /// peers × this many.
    pub max_tcp_connections: usize,
    /// Most TCP connects of one peer waiting for the destination at once;
    /// beyond it, that peer's oldest connect is abandoned for the new SYN
    /// (`--max-tcp-pending-connects`). Per peer.
    pub max_tcp_pending_connects: usize,
    /// A TCP connect not answered within this time is dropped quietly
    /// (`--tcp-connect-timeout`).
    pub tcp_connect_timeout: Duration,
    /// A TCP connection with no traffic either way for this long is reset
    /// (`--tcp-idle-timeout`).
    pub tcp_idle_timeout: Duration,
    /// Most forwarded ICMP echo identities (peer address and echo
    /// identifier) of one peer at once; that peer's least recently used goes
    /// first (`--max-icmp-ids`). Per peer.
    pub max_icmp_ids: usize,
    /// An echo identity without requests or replies for this long is closed.
    pub icmp_idle_timeout: Duration,
    /// Destinations opened despite the default denials (`--allow`).
    pub allow: Vec<crate::core::policy::Rule>,
    /// Destinations denied besides the defaults (`--deny`); wins over allow.
    pub deny: Vec<crate::core::policy::Rule>,
    /// An address inside the tunnel that reaches the host's loopback
    /// (`--host-address`).
    pub host_address: Option<IpAddr>,
    /// Most bytes of the peers' fragments held for reassembly at once.
    pub max_reassembly_bytes: usize,
    /// An incomplete fragmented datagram is dropped after this long.
    pub reassembly_timeout: Duration,
    /// Where to serve WireGuard's configuration protocol, for `wg show`
    /// (`--uapi-socket`). WireGuard transport only.
    pub uapi_socket: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics and a health check over HTTP at this
    /// address (`--metrics`); see [`crate::metrics`].
    pub metrics: Option<SocketAddr>,
    /// Routers that the flows are spread over, each on a task of its own
    /// with its own host sockets, so that they run on several threads at
    /// once ([`crate::core::shard`]), and encryption lanes, each a receive
    /// and a send task of the tunnel: 1 to [`MAX_SHARDS`]. The CLI sets it
    /// to its worker thread count (`--threads`).
    pub shards: usize,
}

/// Smallest tunnel MTU accepted: IPv6's minimum link MTU.
pub const MIN_MTU: u16 = 1280;

/// Smallest tunnel socket buffer accepted: a few packets' worth.
pub const MIN_TUNNEL_SOCKET_BUFFER: usize = 8192;

/// Most router shards (and encryption lanes) accepted, as `--threads`
/// takes at most.
pub const MAX_SHARDS: usize = 1024;

/// Largest tunnel socket buffer accepted: the kernel takes the size as a C
/// `int` and doubles it.
pub const MAX_TUNNEL_SOCKET_BUFFER: usize = 1 << 30;

impl Config {
    /// Defaults for everything but the transport and the bind address.
    pub fn new(transport: Transport, bind: SocketAddr) -> Self {
        Config {
            transport,
            bind,
            mtu: 1420,
            pingable: Vec::new(),
            dns: None,
            dns_timeout: Duration::from_secs(5),
            max_dns_queries: 256,
            resolver_threads: 4,
            tcp_buffer_size: 65535,
            transmit_queue_capacity: 256,
            tunnel_socket_buffer: 4 << 20,
            incoming_udp: Vec::new(),
            incoming_tcp: Vec::new(),
            max_udp_flows: 4096,
            udp_idle_timeout: Duration::from_secs(180),
            max_tcp_connections: 16384,
            max_tcp_pending_connects: 1024,
            tcp_connect_timeout: Duration::from_secs(30),
            tcp_idle_timeout: Duration::from_secs(7200),
            max_icmp_ids: 1024,
            icmp_idle_timeout: Duration::from_secs(60),
            allow: Vec::new(),
            deny: Vec::new(),
            host_address: None,
            max_reassembly_bytes: 4 << 20,
            reassembly_timeout: Duration::from_secs(30),
            uapi_socket: None,
            metrics: None,
            shards: 1,
        }
    }

    /// Checks the limits that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mtu < MIN_MTU {
            return Err(ConfigError::OutOfRange {
                setting: "--mtu",
                why: format!("{} is below the minimum of {MIN_MTU}", self.mtu),
            });
        }
        if self.tcp_buffer_size < 1024 {
            return Err(ConfigError::OutOfRange {
                setting: "--tcp-buffer-size",
                why: format!("{} is below the minimum of 1024", self.tcp_buffer_size),
            });
        }
        if self.transmit_queue_capacity == 0 {
            return Err(ConfigError::OutOfRange {
                setting: "--transmit-queue-capacity",
                why: "it must be at least 1".into(),
            });
        }
        if !(MIN_TUNNEL_SOCKET_BUFFER..=MAX_TUNNEL_SOCKET_BUFFER)
            .contains(&self.tunnel_socket_buffer)
        {
            return Err(ConfigError::OutOfRange {
                setting: "--tunnel-socket-buffer",
                why: format!(
                    "{} is outside {MIN_TUNNEL_SOCKET_BUFFER}–{MAX_TUNNEL_SOCKET_BUFFER}",
                    self.tunnel_socket_buffer
                ),
            });
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(ConfigError::OutOfRange {
                setting: "--threads",
                why: format!("{} is outside 1–{MAX_SHARDS}", self.shards),
            });
        }
        if self.max_udp_flows == 0 {
            return Err(ConfigError::OutOfRange {
                setting: "max UDP flows",
                why: "it must be at least 1".into(),
            });
        }
        if self.dns_timeout.is_zero() {
            return Err(ConfigError::OutOfRange {
                setting: "--dns-timeout",
                why: "it must be more than 0".into(),
            });
        }
        if self.max_dns_queries == 0 {
            return Err(ConfigError::OutOfRange {
                setting: "--max-dns-queries",
                why: "it must be at least 1".into(),
            });
        }
        if self.resolver_threads == 0 {
            return Err(ConfigError::OutOfRange {
                setting: "--resolver-threads",
                why: "it must be at least 1".into(),
            });
        }
        for (setting, value) in [
            ("--max-tcp-connections", self.max_tcp_connections),
            ("--max-tcp-pending-connects", self.max_tcp_pending_connects),
        ] {
            if value == 0 {
                return Err(ConfigError::OutOfRange {
                    setting,
                    why: "it must be at least 1".into(),
                });
            }
        }
        for (setting, value) in [
            ("--tcp-connect-timeout", self.tcp_connect_timeout),
            ("--tcp-idle-timeout", self.tcp_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::OutOfRange {
                    setting,
                    why: "it must be more than 0".into(),
                });
            }
        }
        if let Transport::WireGuard { peers, .. } = &self.transport
            && peers.is_empty()
        {
            return Err(ConfigError::NoPeers);
        }
        if matches!(self.transport, Transport::RawIp { .. }) && self.uapi_socket.is_some() {
            return Err(ConfigError::OutOfRange {
                setting: "--uapi-socket",
                why: "raw IP mode has no WireGuard state to show".into(),
            });
        }
        Ok(())
    }
}

/// Why a setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key did not decode.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A `-t`/`-u` triplet did not parse.
    #[error("invalid forward `{text}`: {why}")]
    InvalidForward {
        /// The text given.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// A number outside what the setting accepts.
    #[error("{setting}: {why}")]
    OutOfRange {
        /// The setting's name, as the user writes it.
        setting: &'static str,
        /// What is wrong with the value.
        why: String,
    },
    /// WireGuard with no peer to talk to.
    #[error("WireGuard needs at least one peer")]
    NoPeers,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_surrounding_whitespace() {
        let key = Key::from_base64("  SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=\n").unwrap();
        assert_eq!(
            key.to_base64(),
            "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928="
        );
    }

    #[test]
    fn key_rejects_wrong_length_and_garbage() {
        let short = Key::from_base64("AAAA").unwrap_err().to_string();
        assert!(short.contains("3 bytes, not 32"), "{short}");
        let garbage = Key::from_base64("not a key!").unwrap_err().to_string();
        assert!(garbage.contains("not valid base64"), "{garbage}");
    }

    #[test]
    fn public_key_matches_wireguard() {
        // The pair from the wgslirpy 0.2.0 demo, made with `wg genkey` and `wg pubkey`.
        let private = Key::from_base64("4Khaa5tgPI9NJsO2R896Yd6748k9fW4aapGZnIcUM14=").unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let (a, b) = (Key::generate_private(), Key::generate_private());
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xc0, 0x40);
    }

    #[test]
    fn key_debug_hides_material() {
        let key = Key([7; 32]);
        assert_eq!(format!("{key:?}"), "Key(..)");
    }

    #[test]
    fn forward_with_source() {
        let f: Forward = "0.0.0.0:1234,10.0.2.1:1234,10.0.2.15:1234".parse().unwrap();
        assert_eq!(f.host, "0.0.0.0:1234".parse().unwrap());
        assert_eq!(f.source, Some("10.0.2.1:1234".parse().unwrap()));
        assert_eq!(f.dest, "10.0.2.15:1234".parse().unwrap());
    }

    #[test]
    fn forward_without_source_and_ipv6() {
        let f: Forward = "[::]:1234,,[fc00::2]:80".parse().unwrap();
        assert_eq!(f.source, None);
        assert_eq!(f.dest, "[fc00::2]:80".parse().unwrap());
    }

    #[test]
    fn forward_errors_name_the_part() {
        let e = "0.0.0.0:1,10.0.2.15:1"
            .parse::<Forward>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("found 2 part(s)"), "{e}");
        let e = "0.0.0.0:1,,nonsense"
            .parse::<Forward>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("DEST `nonsense`"), "{e}");
        let e = "0.0.0.0:1,10.0.0.1:5,[::1]:5"
            .parse::<Forward>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("same IP version"), "{e}");
    }

    /// A raw IP gateway's configuration, otherwise the defaults.
    fn raw_ip_config() -> Config {
        Config::new(
            Transport::RawIp {
                peer_endpoint: None,
            },
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    #[test]
    fn validate_rejects_small_mtu() {
        let mut c = raw_ip_config();
        c.mtu = 500;
        assert!(c.validate().unwrap_err().to_string().starts_with("--mtu"));
    }

    #[test]
    fn validate_takes_1_to_max_shards() {
        let mut c = raw_ip_config();
        for (shards, ok) in [
            (0, false),
            (1, true),
            (MAX_SHARDS, true),
            (MAX_SHARDS + 1, false),
        ] {
            c.shards = shards;
            assert_eq!(c.validate().is_ok(), ok, "{shards}");
        }
        c.shards = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--threads")
        );
    }
}
