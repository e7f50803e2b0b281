//! Command-line flags, compatible with wgslirpy 0.2.0, and their translation
//! into a validated [`Config`].
//!
//! Clap checks the shape of each value (an address, a number, a triplet);
//! [`GatewayArgs::into_config`] checks what needs several flags at once, and
//! reads the key file and the config file (`-c`). Every error names the flag
//! or the file line it is about.
//!
//! Precedence: command line > config file > defaults. A flag counts as given
//! only if it was on the command line ([`Cli::parse_args`] records that), so
//! `--mtu 1420` overrides a file's `MTU` even though 1420 is the default.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use ipnetwork::IpNetwork;
use libwgslirpy::Config;
use libwgslirpy::config::{Forward, Key, PeerConfig, Transport};
use libwgslirpy::config_file::ConfigFile;
use libwgslirpy::core::policy::Rule;

/// The `-k` keyword that, with `-K GUE`, selects raw IP over UDP.
const INSECURE: &str = "INSECURE";
/// The `-K` keyword that, with `-k INSECURE`, selects raw IP over UDP.
const GUE: &str = "GUE";

/// Expose internet access without root using WireGuard.
#[derive(Debug, Parser)]
#[command(
    name = "wgslirpy",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Raw IP mode: `-k INSECURE -K GUE` carries plain IPv4/IPv6 packets in UDP \
                  datagrams (Linux GUE variant 1 / FOU), without WireGuard and without any \
                  authentication.\nLogging: set RUST_LOG (default `info`; `debug` or `trace` \
                  for per-flow and per-packet detail)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

impl Cli {
    /// Parses `args` (the program name first) and records which gateway
    /// flags were given on the command line, for the precedence over a
    /// config file.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        cli.gateway.given = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().to_owned())
            .collect();
        Ok(cli)
    }
}

/// Key utilities, compatible with `wg genkey` and `wg pubkey`, and the
/// one-step setup.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a new random private key (like `wg genkey`).
    Genkey,
    /// Read a private key on standard input and print its public key (like `wg pubkey`).
    Pubkey,
    /// Write a gateway config file with one peer, and print that peer's wg-quick config
    /// and QR code.
    Init {
        /// Where peers will reach the gateway: HOST:PORT (IPv6 as [addr]:port). The
        /// gateway listens on PORT on every address.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: String,
        /// The gateway config file to write.
        #[arg(
            short = 'c',
            long,
            value_name = "FILE",
            default_value = "wgslirpy.conf"
        )]
        config: PathBuf,
        /// Overwrite the config file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Add a peer to a gateway config file made by `init`, and print its wg-quick config
    /// and QR code.
    AddPeer {
        /// The gateway config file to add the peer to.
        #[arg(
            short = 'c',
            long,
            value_name = "FILE",
            default_value = "wgslirpy.conf"
        )]
        config: PathBuf,
        /// A name for the peer, written as a comment above its [Peer] section.
        #[arg(long)]
        name: Option<String>,
        /// Where peers reach the gateway, HOST:PORT, if not the file's PublicEndpoint.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Option<String>,
    },
}

/// The format of log lines on stderr (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of the gateway itself.
#[derive(Clone, Debug, Args)]
pub struct GatewayArgs {
    /// Read the keys, peers and settings from this file: WireGuard's format (a file for
    /// `wg setconf` or `wg-quick` works), plus a [wgslirpy] section. Flags override it.
    #[arg(short = 'c', long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Main private key of this WireGuard node, base64-encoded, or INSECURE for raw IP mode.
    #[arg(
        short = 'k',
        long,
        value_name = "KEY",
        conflicts_with = "private_key_file"
    )]
    private_key: Option<String>,

    /// Main private key of this WireGuard node: a file holding it, base64-encoded
    /// (surrounding whitespace is ignored, so `wg genkey > FILE` works).
    #[arg(short = 'f', long, value_name = "FILE")]
    private_key_file: Option<PathBuf>,

    /// Peer's public key, base64-encoded, or GUE for raw IP mode.
    #[arg(
        short = 'K',
        long,
        value_name = "KEY",
        required_unless_present = "config"
    )]
    peer_key: Option<String>,

    /// Address of the peer's UDP socket, where to send handshakes and keepalives.
    /// In raw IP mode, only datagrams from this address are accepted.
    #[arg(short = 'p', long, value_name = "IP:PORT")]
    peer_endpoint: Option<SocketAddr>,

    /// Narrow the inner addresses the --peer-key peer may send from (and that are routed to
    /// it) to these networks: a comma list of CIDRs, a bare address meaning one host.
    /// Packets from other inner sources are dropped. Default: every address, v4 and v6.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    peer_allowed_ips: Vec<IpNetwork>,

    /// Persistent keepalive interval, in seconds.
    #[arg(short = 'a', long, value_name = "SECONDS", value_parser = clap::value_parser!(u16).range(1..))]
    keepalive_interval: Option<u16>,

    /// Where to bind our own UDP socket for the WireGuard connection.
    #[arg(
        short = 'b',
        long,
        value_name = "IP:PORT",
        required_unless_present = "config"
    )]
    bind_ip_port: Option<SocketAddr>,

    /// Serve DNS over UDP and TCP at this address within the WireGuard network: A and AAAA from the
    /// host's resolver (so /etc/hosts applies), other types forwarded to the nameservers of
    /// /etc/resolv.conf (NOTIMP if it names none).
    #[arg(short = 'D', long, value_name = "IP:PORT")]
    dns: Option<SocketAddr>,

    /// Answer a DNS query SERVFAIL if the resolver or the nameservers have not answered
    /// within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    dns_timeout: u64,

    /// Most DNS queries of each peer in flight at once; more are answered SERVFAIL at once.
    #[arg(long, value_name = "QUERIES", default_value_t = 256)]
    max_dns_queries: usize,

    /// Threads that may wait in the host resolver (getaddrinfo) at once; further A/AAAA
    /// queries wait for one.
    #[arg(long, value_name = "THREADS", default_value_t = 4)]
    resolver_threads: usize,

    /// Reply to ICMP pings on this address within the WireGuard network. Repeatable
    /// (for example one IPv4 and one IPv6 address).
    #[arg(short = 'P', long, value_name = "IP")]
    pingable: Vec<IpAddr>,

    /// Maximum transfer unit of the tunnel: the largest IP packet sent to the peer.
    #[arg(long, value_name = "BYTES", default_value_t = 1420)]
    mtu: u16,

    /// Per-connection TCP buffer size, in bytes. The operating system's socket buffer also applies.
    #[arg(long, value_name = "BYTES", default_value_t = 65535)]
    tcp_buffer_size: usize,

    /// Number of outgoing (to WireGuard) packets to hold in a queue; more are dropped.
    #[arg(long, value_name = "PACKETS", default_value_t = 256)]
    transmit_queue_capacity: usize,

    /// Kernel buffer to ask for on the tunnel's UDP socket, each way, in bytes: bursts from the
    /// peers wait there instead of being lost. Without CAP_NET_ADMIN the kernel caps it at
    /// net.core.rmem_max and net.core.wmem_max (logged at startup when it does).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    tunnel_socket_buffer: usize,

    /// Most UDP flows of each peer at once; when a peer's are full, its least recently used
    /// flow is closed (never another peer's).
    #[arg(long, value_name = "FLOWS", default_value_t = 4096)]
    max_udp_flows: usize,

    /// Close a UDP flow after this many seconds without traffic in either direction.
    #[arg(long, value_name = "SECONDS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    udp_idle_timeout: u64,

    /// Most TCP connections of each peer at once (closing ones included); its new connections
    /// beyond it are refused with RST. Existing connections are never closed to make room.
    #[arg(long, value_name = "CONNECTIONS", default_value_t = 16384)]
    max_tcp_connections: usize,

    /// Most TCP connections of each peer waiting for their destination to answer at once;
    /// beyond it, the peer's oldest such connect is abandoned for the new one.
    #[arg(long, value_name = "CONNECTIONS", default_value_t = 1024)]
    max_tcp_pending_connects: usize,

    /// Give up a TCP connect that the destination has not answered after this many seconds;
    /// the peer's SYN is left unanswered (as a lost packet would be).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    tcp_connect_timeout: u64,

    /// Reset a TCP connection after this many seconds without traffic in either direction
    /// (at most 600 once either side has closed its half).
    #[arg(long, value_name = "SECONDS", default_value_t = 7200, value_parser = clap::value_parser!(u64).range(1..))]
    tcp_idle_timeout: u64,

    /// Let peers reach this denied destination: CIDR, CIDR:PORT or CIDR:LOW-HIGH (IPv6 as
    /// [CIDR]:PORT). Repeatable. By default the host's loopback and own addresses, link-local,
    /// unspecified, multicast and broadcast addresses are denied.
    #[arg(long, value_name = "RULE")]
    allow: Vec<Rule>,

    /// Deny peers this destination too, in the same syntax as --allow; wins over --allow.
    /// Repeatable.
    #[arg(long, value_name = "RULE")]
    deny: Vec<Rule>,

    /// Map this address inside the tunnel to the host's loopback, so that peers can reach
    /// services on the gateway host itself (like slirp's 10.0.2.2).
    #[arg(long, value_name = "IP")]
    host_address: Option<IpAddr>,

    /// Most bytes of fragments from peers held for reassembly at once.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    max_reassembly_bytes: usize,

    /// Most ICMP echo identities (peer address and echo identifier) of each peer forwarded at
    /// once.
    #[arg(long, value_name = "IDS", default_value_t = 1024)]
    max_icmp_ids: usize,

    /// Serve WireGuard's configuration protocol on this UNIX socket, so that `wg show` works:
    /// with /var/run/wireguard/NAME.sock, `wg show NAME` reports the peers and their state.
    #[arg(long, value_name = "PATH")]
    uapi_socket: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics and a health check at /healthz.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,

    /// Log line format on stderr: text, or json (one object per line) for log collectors.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Worker threads, and router shards: flows are spread over that many routers, which run
    /// in parallel on the threads, as do WireGuard encryption and decryption. 1 runs
    /// everything on one thread. Default: the number of available cores.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Forward this host UDP port into the WireGuard network: HOST,SOURCE,DEST, where
    /// SOURCE may be empty. Repeatable. Example: -u 0.0.0.0:1234,10.0.2.1:1234,10.0.2.15:1234
    #[arg(short = 'u', long, value_name = "HOST,SOURCE,DEST")]
    incoming_udp: Vec<Forward>,

    /// Forward this host TCP port into the WireGuard network: HOST,SOURCE,DEST, where
    /// SOURCE may be empty; a SOURCE port of 0 picks ports round-robin. Repeatable.
    /// Example: -t 0.0.0.0:1234,,10.0.2.15:1234
    #[arg(short = 't', long, value_name = "HOST,SOURCE,DEST")]
    incoming_tcp: Vec<Forward>,

    /// Ids of the flags given on the command line (see [`Cli::parse_args`]).
    #[arg(skip)]
    given: BTreeSet<String>,
}

impl GatewayArgs {
    /// The config file (`-c`), if one was given: SIGHUP re-reads it.
    pub fn config_file(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// Checks the flags together, with the config file if there is one, and
    /// builds the gateway's configuration.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file = self.config.as_deref().map(ConfigFile::load).transpose()?;
        let transport = match &file {
            None => self.transport()?,
            Some(file) => self.transport_with_file(file)?,
        };
        let bind = match (self.bind_ip_port, &file) {
            (Some(bind), _) => bind,
            (None, Some(file)) => file.bind().with_context(|| {
                format!(
                    "{}: no Bind in [wgslirpy] nor ListenPort in [Interface], and no \
                     --bind-ip-port",
                    file.path.display()
                )
            })?,
            (None, None) => bail!("--bind-ip-port is required"),
        };
        let mut config = Config::new(transport, bind);
        if let Some(file) = &file {
            file.settings.apply(&mut config);
        }
        config.shards = self.worker_threads();
        self.apply_flags(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// The worker thread count: `--threads`, else the available cores (at
    /// most as many as `--threads` takes).
    pub fn worker_threads(&self) -> usize {
        self.threads.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(libwgslirpy::config::MAX_SHARDS)
        })
    }

    /// Sets on `config` the router settings given on the command line. A
    /// repeatable flag replaces the file's list rather than adding to it.
    fn apply_flags(self, config: &mut Config) {
        let given = |id: &str| self.given.contains(id);
        if given("mtu") {
            config.mtu = self.mtu;
        }
        if given("tcp_buffer_size") {
            config.tcp_buffer_size = self.tcp_buffer_size;
        }
        if given("transmit_queue_capacity") {
            config.transmit_queue_capacity = self.transmit_queue_capacity;
        }
        if given("tunnel_socket_buffer") {
            config.tunnel_socket_buffer = self.tunnel_socket_buffer;
        }
        if given("max_udp_flows") {
            config.max_udp_flows = self.max_udp_flows;
        }
        if given("udp_idle_timeout") {
            config.udp_idle_timeout = Duration::from_secs(self.udp_idle_timeout);
        }
        if self.dns.is_some() {
            config.dns = self.dns;
        }
        if !self.pingable.is_empty() {
            config.pingable = self.pingable;
        }
        if !self.incoming_udp.is_empty() {
            config.incoming_udp = self.incoming_udp;
        }
        if !self.incoming_tcp.is_empty() {
            config.incoming_tcp = self.incoming_tcp;
        }
        if self.uapi_socket.is_some() {
            config.uapi_socket = self.uapi_socket;
        }
        if self.metrics.is_some() {
            config.metrics = self.metrics;
        }
        if given("dns_timeout") {
            config.dns_timeout = Duration::from_secs(self.dns_timeout);
        }
        if given("max_dns_queries") {
            config.max_dns_queries = self.max_dns_queries;
        }
        if given("resolver_threads") {
            config.resolver_threads = self.resolver_threads;
        }
        if given("max_tcp_connections") {
            config.max_tcp_connections = self.max_tcp_connections;
        }
        if given("max_tcp_pending_connects") {
            config.max_tcp_pending_connects = self.max_tcp_pending_connects;
        }
        if given("tcp_connect_timeout") {
            config.tcp_connect_timeout = Duration::from_secs(self.tcp_connect_timeout);
        }
        if given("tcp_idle_timeout") {
            config.tcp_idle_timeout = Duration::from_secs(self.tcp_idle_timeout);
        }
        if given("max_reassembly_bytes") {
            config.max_reassembly_bytes = self.max_reassembly_bytes;
        }
        if given("max_icmp_ids") {
            config.max_icmp_ids = self.max_icmp_ids;
        }
        if !self.allow.is_empty() {
            config.allow = self.allow;
        }
        if !self.deny.is_empty() {
            config.deny = self.deny;
        }
        if self.host_address.is_some() {
            config.host_address = self.host_address;
        }
    }

    /// The private key's text and the flag it came from, if given.
    fn private_key_text(&self) -> anyhow::Result<Option<(String, &'static str)>> {
        Ok(match (&self.private_key, &self.private_key_file) {
            (Some(key), None) => Some((key.clone(), "--private-key")),
            (None, Some(path)) => Some((
                std::fs::read_to_string(path)
                    .with_context(|| format!("--private-key-file {}", path.display()))?,
                "--private-key-file",
            )),
            (None, None) => None,
            (Some(_), Some(_)) => unreachable!("clap rejects both"),
        })
    }

    /// The transport from the flags alone, as in wgslirpy 0.2.0.
    fn transport(&self) -> anyhow::Result<Transport> {
        let Some((private_key, source)) = self.private_key_text()? else {
            bail!("a private key is needed: give --private-key or --private-key-file")
        };
        let peer_key = self.peer_key.as_deref().context("--peer-key is required")?;
        let raw_ip = (private_key.trim() == INSECURE, peer_key == GUE);
        match raw_ip {
            (true, true) => {
                if self.keepalive_interval.is_some() {
                    bail!(
                        "--keepalive-interval has no meaning in raw IP mode (-k INSECURE -K GUE)"
                    );
                }
                if !self.peer_allowed_ips.is_empty() {
                    bail!(
                        "--peer-allowed-ips has no meaning in raw IP mode (-k INSECURE -K GUE): \
                         any sender may use any inner address"
                    );
                }
                Ok(Transport::RawIp {
                    peer_endpoint: self.peer_endpoint,
                })
            }
            (true, false) => bail!("-k INSECURE needs -K GUE (raw IP mode)"),
            (false, true) => bail!("-K GUE needs -k INSECURE (raw IP mode)"),
            (false, false) => {
                let private_key = Key::from_base64(&private_key).context(source)?;
                Ok(Transport::WireGuard {
                    private_key,
                    peers: vec![self.flag_peer(peer_key)?],
                })
            }
        }
    }

    /// The WireGuard transport from a config file, with the flags on top:
    /// `-k`/`-f` replace the file's private key; the `-K` peer is added to
    /// the file's peers, or, if the file has that key, `-p` and `-a`
    /// override that peer's endpoint and keepalive.
    fn transport_with_file(&self, file: &ConfigFile) -> anyhow::Result<Transport> {
        let path = file.path.display();
        let key_text = self.private_key_text()?;
        let insecure = key_text.as_ref().is_some_and(|(k, _)| k.trim() == INSECURE);
        if insecure || self.peer_key.as_deref() == Some(GUE) {
            bail!("raw IP mode (-k INSECURE -K GUE) cannot be combined with --config");
        }
        let private_key = match key_text {
            Some((text, source)) => Key::from_base64(&text).context(source)?,
            None => file.private_key.with_context(|| {
                format!(
                    "{path}: no PrivateKey in [Interface], and no --private-key or \
                     --private-key-file"
                )
            })?,
        };
        let mut peers = file.peers.clone();
        match &self.peer_key {
            Some(peer_key) => {
                let flag_peer = self.flag_peer(peer_key)?;
                match peers
                    .iter_mut()
                    .find(|peer| peer.public_key == flag_peer.public_key)
                {
                    Some(peer) => {
                        peer.endpoint = flag_peer.endpoint.or(peer.endpoint);
                        peer.keepalive = flag_peer.keepalive.or(peer.keepalive);
                        if !self.peer_allowed_ips.is_empty() {
                            peer.allowed_ips = flag_peer.allowed_ips;
                        }
                    }
                    None => peers.push(flag_peer),
                }
            }
            None if self.peer_endpoint.is_some()
                || self.keepalive_interval.is_some()
                || !self.peer_allowed_ips.is_empty() =>
            {
                bail!(
                    "--peer-endpoint, --keepalive-interval and --peer-allowed-ips need --peer-key"
                )
            }
            None if peers.is_empty() => bail!("{path}: no [Peer] section, and no --peer-key"),
            None => {}
        }
        Ok(Transport::WireGuard { private_key, peers })
    }

    /// The peer that `-K`, `-p`, `-a` and `--peer-allowed-ips` describe; without
    /// `--peer-allowed-ips` it may use any inner address, as in 0.2.0.
    fn flag_peer(&self, peer_key: &str) -> anyhow::Result<PeerConfig> {
        Ok(PeerConfig {
            public_key: Key::from_base64(peer_key).context("--peer-key")?,
            preshared_key: None,
            endpoint: self.peer_endpoint,
            keepalive: self.keepalive_interval,
            allowed_ips: match self.peer_allowed_ips.is_empty() {
                true => PeerConfig::allow_all(),
                false => self.peer_allowed_ips.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=";
    const PEER: &str = "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=";
    /// The public key of `PRIVATE`.
    const PRIVATE_PUBLIC: &str = "MR2RF5Tp+6BKt9k+deKg1GqR3re3ckJKti+uwZA84DU=";

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::parse_args(std::iter::once("wgslirpy").chain(args.iter().copied()))?;
        cli.gateway.into_config()
    }

    #[test]
    fn threads_is_a_positive_count_and_optional() {
        let threads = |extra: &[&str]| {
            let args = [
                "wgslirpy",
                "-k",
                PRIVATE,
                "-b",
                "127.0.0.1:9797",
                "-K",
                PEER,
            ];
            Cli::parse_args(args.iter().chain(extra)).map(|cli| cli.gateway.threads)
        };
        assert_eq!(threads(&[]).unwrap(), None);
        assert_eq!(threads(&["--threads", "1"]).unwrap(), Some(1));
        assert_eq!(threads(&["--threads", "4"]).unwrap(), Some(4));
        assert!(threads(&["--threads", "0"]).is_err());
        assert!(threads(&["--threads", "many"]).is_err());
        // The router shards (and encryption lanes) follow the threads.
        let base = ["-k", PRIVATE, "-b", "127.0.0.1:9797", "-K", PEER];
        let shards = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args).unwrap().shards
        };
        assert_eq!(shards(&["--threads", "3"]), 3);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(shards(&[]), cores.min(libwgslirpy::config::MAX_SHARDS));
    }

    #[test]
    fn original_demo_command_line_parses() {
        let config = parse(&[
            "--private-key",
            PRIVATE,
            "-b",
            "127.0.0.1:9797",
            "--peer-key",
            PEER,
            "--peer-endpoint",
            "127.0.0.1:9796",
            "--keepalive-interval",
            "10",
            "--dns",
            "192.168.72.2:53",
            "--pingable",
            "192.168.72.2",
        ])
        .unwrap();
        assert_eq!(config.mtu, 1420);
        assert_eq!(config.tcp_buffer_size, 65535);
        assert_eq!(config.transmit_queue_capacity, 256);
        let Transport::WireGuard { peers, .. } = config.transport else {
            panic!("not WireGuard");
        };
        assert_eq!(peers[0].endpoint, Some("127.0.0.1:9796".parse().unwrap()));
        assert_eq!(peers[0].keepalive, Some(10));
    }

    #[test]
    fn raw_ip_mode_keywords() {
        let config = parse(&[
            "-k",
            "INSECURE",
            "-K",
            "GUE",
            "-b",
            "127.0.0.1:6556",
            "-P",
            "10.0.2.1",
        ])
        .unwrap();
        assert!(matches!(
            config.transport,
            Transport::RawIp {
                peer_endpoint: None
            }
        ));
        let half = parse(&["-k", "INSECURE", "-K", PEER, "-b", "127.0.0.1:1"]).unwrap_err();
        assert_eq!(half.to_string(), "-k INSECURE needs -K GUE (raw IP mode)");
    }

    #[test]
    fn repeatable_flags_collect() {
        let config = parse(&[
            "-k",
            PRIVATE,
            "-K",
            PEER,
            "-b",
            "[::]:1",
            "-P",
            "10.0.2.1",
            "-P",
            "fd00::1",
            "-t",
            "0.0.0.0:80,,10.0.2.15:80",
            "-t",
            "[::]:81,,[fd00::2]:81",
            "-u",
            "0.0.0.0:53,10.0.2.1:53,10.0.2.15:53",
        ])
        .unwrap();
        assert_eq!(config.pingable.len(), 2);
        assert_eq!(config.incoming_tcp.len(), 2);
        assert_eq!(config.incoming_udp.len(), 1);
    }

    #[test]
    fn errors_name_the_flag() {
        let bad_key = parse(&["-k", "nope", "-K", PEER, "-b", "127.0.0.1:1"]).unwrap_err();
        assert!(
            format!("{bad_key:#}").starts_with("--private-key: invalid key"),
            "{bad_key:#}"
        );
        let bad_peer = parse(&["-k", PRIVATE, "-K", "AAAA", "-b", "127.0.0.1:1"]).unwrap_err();
        assert!(
            format!("{bad_peer:#}").starts_with("--peer-key: invalid key"),
            "{bad_peer:#}"
        );
        let no_key = parse(&["-K", PEER, "-b", "127.0.0.1:1"]).unwrap_err();
        assert!(no_key.to_string().contains("--private-key-file"));
        let bad_mtu = parse(&[
            "-k",
            PRIVATE,
            "-K",
            PEER,
            "-b",
            "127.0.0.1:1",
            "--mtu",
            "100",
        ])
        .unwrap_err();
        assert!(bad_mtu.to_string().starts_with("--mtu"));
    }

    #[test]
    fn key_file_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("wgslirpy-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, format!("{PRIVATE}\n")).unwrap();
        let config = parse(&[
            "-f",
            file.to_str().unwrap(),
            "-K",
            PEER,
            "-b",
            "127.0.0.1:1",
        ]);
        std::fs::remove_dir_all(&dir).unwrap();
        let Transport::WireGuard { private_key, .. } = config.unwrap().transport else {
            panic!("not WireGuard");
        };
        assert_eq!(private_key.to_base64(), PRIVATE);
    }

    /// Writes `text` to a fresh file and parses `args` with `-c FILE` first.
    fn parse_with_file(text: &str, args: &[&str]) -> anyhow::Result<Config> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "wgslirpy-args-{}-{}.conf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        let path_text = path.to_str().unwrap().to_owned();
        let mut all = vec!["-c", path_text.as_str()];
        all.extend_from_slice(args);
        let result = parse(&all);
        std::fs::remove_file(&path).unwrap();
        result
    }

    /// The file's private key.
    const OTHER: &str = "4Khaa5tgPI9NJsO2R896Yd6748k9fW4aapGZnIcUM14=";

    /// A gateway file with one peer, `PEER`, and a few settings.
    fn file_text() -> String {
        format!(
            "[Interface]\nPrivateKey = {OTHER}\nListenPort = 5000\n\
             [Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.0.2.2/32\n\
             Endpoint = 192.0.2.1:51820\nPersistentKeepalive = 5\n\
             [wgslirpy]\nMTU = 1300\nMaxUdpFlows = 7\nPingable = 10.0.2.1\n"
        )
    }

    fn peers(config: &Config) -> &[PeerConfig] {
        match &config.transport {
            Transport::WireGuard { peers, .. } => peers,
            Transport::RawIp { .. } => panic!("not WireGuard"),
        }
    }

    #[test]
    fn config_file_alone() {
        let config = parse_with_file(&file_text(), &[]).unwrap();
        assert_eq!(config.bind, "[::]:5000".parse().unwrap());
        assert_eq!(config.mtu, 1300);
        assert_eq!(config.max_udp_flows, 7);
        assert_eq!(config.pingable, ["10.0.2.1".parse::<IpAddr>().unwrap()]);
        let Transport::WireGuard { private_key, .. } = &config.transport else {
            panic!("not WireGuard");
        };
        assert_eq!(private_key.to_base64(), OTHER);
        let [peer] = peers(&config) else {
            panic!("one peer wanted")
        };
        assert_eq!(peer.public_key.to_base64(), PEER);
        assert_eq!(peer.allowed_ips, ["10.0.2.2/32".parse().unwrap()]);
        assert_eq!(peer.keepalive, Some(5));
    }

    /// Command line > file > default, and a flag given with its default
    /// value still counts as given.
    #[test]
    fn precedence_command_line_then_file_then_default() {
        let config = parse_with_file(
            &file_text(),
            &[
                "--mtu",
                "1420",
                "-P",
                "fd00::1",
                "-k",
                PRIVATE,
                "-b",
                "127.0.0.1:6000",
            ],
        )
        .unwrap();
        assert_eq!(config.mtu, 1420, "command line over file");
        assert_eq!(config.max_udp_flows, 7, "file over default");
        assert_eq!(config.tcp_buffer_size, 65535, "default");
        assert_eq!(
            config.pingable,
            ["fd00::1".parse::<IpAddr>().unwrap()],
            "-P replaces the file's list"
        );
        assert_eq!(config.bind, "127.0.0.1:6000".parse().unwrap());
        let Transport::WireGuard { private_key, .. } = &config.transport else {
            panic!("not WireGuard");
        };
        assert_eq!(private_key.to_base64(), PRIVATE, "-k over PrivateKey");
    }

    #[test]
    fn flag_peer_is_added_or_overrides_the_same_key() {
        let added = parse_with_file(&file_text(), &["-K", PRIVATE_PUBLIC, "-a", "9"]).unwrap();
        let peers_added = peers(&added);
        assert_eq!(peers_added.len(), 2);
        assert_eq!(peers_added[1].public_key.to_base64(), PRIVATE_PUBLIC);
        assert_eq!(peers_added[1].allowed_ips, PeerConfig::allow_all());
        assert_eq!(peers_added[1].keepalive, Some(9));

        let same = parse_with_file(&file_text(), &["-K", PEER, "-p", "192.0.2.9:1"]).unwrap();
        let [peer] = peers(&same) else {
            panic!("the flags must override the file's peer, not add one")
        };
        assert_eq!(peer.endpoint, Some("192.0.2.9:1".parse().unwrap()));
        assert_eq!(peer.keepalive, Some(5), "no -a: the file's keepalive stays");
        assert_eq!(peer.allowed_ips, ["10.0.2.2/32".parse().unwrap()]);
    }

    #[test]
    fn peer_allowed_ips_narrows_the_flag_peer() {
        let config = parse(&[
            "-k",
            PRIVATE,
            "-K",
            PEER,
            "-b",
            "127.0.0.1:1",
            "--peer-allowed-ips",
            "10.0.2.15/32,fd00::15/128",
            "--peer-allowed-ips",
            "192.0.2.7",
        ])
        .unwrap();
        let [peer] = peers(&config) else {
            panic!("one peer")
        };
        let expected: Vec<ipnetwork::IpNetwork> = ["10.0.2.15/32", "fd00::15/128", "192.0.2.7/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(peer.allowed_ips, expected);

        // Over a config file's peer with the same key, the flag replaces its AllowedIPs.
        let same = parse_with_file(
            &file_text(),
            &["-K", PEER, "--peer-allowed-ips", "10.0.2.9"],
        )
        .unwrap();
        assert_eq!(
            peers(&same)[0].allowed_ips,
            ["10.0.2.9/32".parse().unwrap()]
        );

        let raw = parse(&[
            "-k",
            "INSECURE",
            "-K",
            "GUE",
            "-b",
            "127.0.0.1:1",
            "--peer-allowed-ips",
            "10.0.2.15/32",
        ])
        .unwrap_err();
        assert!(
            raw.to_string()
                .starts_with("--peer-allowed-ips has no meaning in raw IP mode")
        );
        let bad = Cli::parse_args(["wgslirpy", "--peer-allowed-ips", "10.0.2.300/32"]).unwrap_err();
        assert!(bad.to_string().contains("--peer-allowed-ips"), "{bad}");
    }

    #[test]
    fn config_file_errors() {
        let no_key = format!("[Peer]\nPublicKey = {PEER}\n[wgslirpy]\nBind = 127.0.0.1:1\n");
        let error = parse_with_file(&no_key, &[]).unwrap_err().to_string();
        assert!(
            error.ends_with(
                "no PrivateKey in [Interface], and no --private-key or --private-key-file"
            ),
            "{error}"
        );
        let error = parse_with_file(
            &format!("[Interface]\nPrivateKey = {OTHER}\n"),
            &["-K", PEER],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("no Bind in [wgslirpy] nor ListenPort"),
            "{error}"
        );
        let error = parse_with_file(&file_text(), &["-p", "192.0.2.1:1"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--peer-endpoint, --keepalive-interval and --peer-allowed-ips need --peer-key"
        );
        let error = parse_with_file(&file_text(), &["-k", "INSECURE", "-K", "GUE"]).unwrap_err();
        assert!(error.to_string().starts_with("raw IP mode"), "{error}");
        let error = parse_with_file("[Interface]\nListenPort = x\n", &[]).unwrap_err();
        assert!(
            format!("{error:#}").ends_with(".conf:2: ListenPort: `x` is not a port number"),
            "{error:#}"
        );
        let error = parse(&["-c", "/nonexistent.conf"]).unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            "cannot read /nonexistent.conf: No such file or directory (os error 2)"
        );
    }

    /// Without `-c`, a flag left out means the library's default, so the
    /// 0.2.0 command line means what it did.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let config = parse(&["-k", PRIVATE, "-K", PEER, "-b", "127.0.0.1:1"]).unwrap();
        let library = Config::new(config.transport.clone(), config.bind);
        assert_eq!(config.mtu, library.mtu);
        assert_eq!(config.tcp_buffer_size, library.tcp_buffer_size);
        assert_eq!(
            config.transmit_queue_capacity,
            library.transmit_queue_capacity
        );
        assert_eq!(config.max_udp_flows, library.max_udp_flows);
        assert_eq!(config.udp_idle_timeout, library.udp_idle_timeout);
        assert_eq!(config.tunnel_socket_buffer, library.tunnel_socket_buffer);
        // And flags not given are not mistaken for given ones.
        let cli = Cli::parse_args([
            "wgslirpy",
            "-k",
            PRIVATE,
            "-K",
            PEER,
            "-b",
            "127.0.0.1:1",
            "--mtu",
            "1400",
        ])
        .unwrap();
        let given = &cli.gateway.given;
        for id in ["bind_ip_port", "mtu", "peer_key", "private_key"] {
            assert!(given.contains(id), "{id} not recorded in {given:?}");
        }
        for id in [
            "tcp_buffer_size",
            "max_udp_flows",
            "udp_idle_timeout",
            "config",
        ] {
            assert!(!given.contains(id), "{id} was not given: {given:?}");
        }
    }

    #[test]
    fn tcp_limits_parse_and_zero_is_refused() {
        let base = ["-k", PRIVATE, "-K", PEER, "-b", "127.0.0.1:1"];
        let config = parse(&base).unwrap();
        assert_eq!(config.max_tcp_connections, 16384);
        assert_eq!(config.tcp_idle_timeout, Duration::from_secs(7200));
        let mut args = base.to_vec();
        args.extend([
            "--max-tcp-connections",
            "10",
            "--max-tcp-pending-connects",
            "5",
            "--tcp-connect-timeout",
            "3",
            "--tcp-idle-timeout",
            "60",
        ]);
        let config = parse(&args).unwrap();
        assert_eq!(
            (
                config.max_tcp_connections,
                config.max_tcp_pending_connects,
                config.tcp_connect_timeout,
                config.tcp_idle_timeout
            ),
            (10, 5, Duration::from_secs(3), Duration::from_secs(60))
        );
        let mut zero = base.to_vec();
        zero.extend(["--max-tcp-connections", "0"]);
        let error = parse(&zero).unwrap_err().to_string();
        assert!(error.starts_with("--max-tcp-connections"), "{error}");
    }

    #[test]
    fn tunnel_socket_buffer_parses_and_out_of_range_is_refused() {
        let base = ["-k", PRIVATE, "-K", PEER, "-b", "127.0.0.1:1"];
        let mut args = base.to_vec();
        args.extend(["--tunnel-socket-buffer", "1048576"]);
        assert_eq!(parse(&args).unwrap().tunnel_socket_buffer, 1 << 20);
        for size in ["100", "3000000000"] {
            let mut args = base.to_vec();
            args.extend(["--tunnel-socket-buffer", size]);
            let error = parse(&args).unwrap_err().to_string();
            assert!(error.starts_with("--tunnel-socket-buffer"), "{error}");
        }
    }

    #[test]
    fn dns_settings() {
        let base = [
            "-k",
            PRIVATE,
            "-K",
            PEER,
            "-b",
            "127.0.0.1:1",
            "-D",
            "10.0.2.3:53",
        ];
        let config = parse(&base).unwrap();
        assert_eq!(config.dns, Some("10.0.2.3:53".parse().unwrap()));
        assert_eq!(config.dns_timeout, Duration::from_secs(5));
        let mut args = base.to_vec();
        args.extend([
            "--dns-timeout",
            "2",
            "--max-dns-queries",
            "10",
            "--resolver-threads",
            "1",
        ]);
        let config = parse(&args).unwrap();
        assert_eq!(config.dns_timeout, Duration::from_secs(2));
        assert_eq!((config.max_dns_queries, config.resolver_threads), (10, 1));
        let mut zero = base.to_vec();
        zero.extend(["--resolver-threads", "0"]);
        let error = parse(&zero).unwrap_err().to_string();
        assert!(error.starts_with("--resolver-threads"), "{error}");
        let mut zero = base.to_vec();
        zero.extend(["--dns-timeout", "0"]);
        assert!(parse(&zero).is_err());
    }

    #[test]
    fn help_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
