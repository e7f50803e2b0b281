//! Command-line flags, compatible with wgslirpy 0.2.0, and their translation
//! into a validated [`Config`].
//!
//! Clap checks the shape of each value (an address, a number, a triplet);
//! [`GatewayArgs::into_config`] checks what needs several flags at once, and
//! reads the key file. Every error names the flag it is about.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use libwgslirpy::Config;
use libwgslirpy::config::{Forward, Key, PeerConfig, Transport};

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

/// Key utilities, compatible with `wg genkey` and `wg pubkey`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a new random private key (like `wg genkey`).
    Genkey,
    /// Read a private key on standard input and print its public key (like `wg pubkey`).
    Pubkey,
}

/// Flags of the gateway itself.
#[derive(Debug, Args)]
pub struct GatewayArgs {
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
    #[arg(short = 'K', long, value_name = "KEY", required = true)]
    peer_key: Option<String>,

    /// Address of the peer's UDP socket, where to send handshakes and keepalives.
    /// In raw IP mode, only datagrams from this address are accepted.
    #[arg(short = 'p', long, value_name = "IP:PORT")]
    peer_endpoint: Option<SocketAddr>,

    /// Persistent keepalive interval, in seconds.
    #[arg(short = 'a', long, value_name = "SECONDS", value_parser = clap::value_parser!(u16).range(1..))]
    keepalive_interval: Option<u16>,

    /// Where to bind our own UDP socket for the WireGuard connection.
    #[arg(short = 'b', long, value_name = "IP:PORT", required = true)]
    bind_ip_port: Option<SocketAddr>,

    /// Use this UDP socket address as a simple A/AAAA-only DNS server within the WireGuard network.
    #[arg(short = 'D', long, value_name = "IP:PORT")]
    dns: Option<SocketAddr>,

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

    /// Most UDP flows at once; when full, the least recently used flow is closed.
    #[arg(long, value_name = "FLOWS", default_value_t = 4096)]
    max_udp_flows: usize,

    /// Close a UDP flow after this many seconds without traffic in either direction.
    #[arg(long, value_name = "SECONDS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    udp_idle_timeout: u64,

    /// Serve WireGuard's configuration protocol on this UNIX socket, so that `wg show` works:
    /// with /var/run/wireguard/NAME.sock, `wg show NAME` reports the peers and their state.
    #[arg(long, value_name = "PATH")]
    uapi_socket: Option<PathBuf>,

    /// Forward this host UDP port into the WireGuard network: HOST,SOURCE,DEST, where
    /// SOURCE may be empty. Repeatable. Example: -u 0.0.0.0:1234,10.0.2.1:1234,10.0.2.15:1234
    #[arg(short = 'u', long, value_name = "HOST,SOURCE,DEST")]
    incoming_udp: Vec<Forward>,

    /// Forward this host TCP port into the WireGuard network: HOST,SOURCE,DEST, where
    /// SOURCE may be empty; a SOURCE port of 0 picks ports round-robin. Repeatable.
    /// Example: -t 0.0.0.0:1234,,10.0.2.15:1234
    #[arg(short = 't', long, value_name = "HOST,SOURCE,DEST")]
    incoming_tcp: Vec<Forward>,
}

impl GatewayArgs {
    /// Checks the flags together and builds the gateway's configuration.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let transport = self.transport()?;
        let bind = self.bind_ip_port.context("--bind-ip-port is required")?;
        let mut config = Config::new(transport, bind);
        config.mtu = self.mtu;
        config.pingable = self.pingable;
        config.dns = self.dns;
        config.tcp_buffer_size = self.tcp_buffer_size;
        config.transmit_queue_capacity = self.transmit_queue_capacity;
        config.max_udp_flows = self.max_udp_flows;
        config.udp_idle_timeout = Duration::from_secs(self.udp_idle_timeout);
        config.incoming_udp = self.incoming_udp;
        config.incoming_tcp = self.incoming_tcp;
        config.uapi_socket = self.uapi_socket;
        config.validate()?;
        Ok(config)
    }

    fn transport(&self) -> anyhow::Result<Transport> {
        let private_key = match (&self.private_key, &self.private_key_file) {
            (Some(key), None) => key.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("--private-key-file {}", path.display()))?,
            (None, None) => {
                bail!("a private key is needed: give --private-key or --private-key-file")
            }
            (Some(_), Some(_)) => unreachable!("clap rejects both"),
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
                Ok(Transport::RawIp {
                    peer_endpoint: self.peer_endpoint,
                })
            }
            (true, false) => bail!("-k INSECURE needs -K GUE (raw IP mode)"),
            (false, true) => bail!("-K GUE needs -k INSECURE (raw IP mode)"),
            (false, false) => {
                let source = if self.private_key.is_some() {
                    "--private-key"
                } else {
                    "--private-key-file"
                };
                let private_key = Key::from_base64(&private_key).context(source)?;
                let public_key = Key::from_base64(peer_key).context("--peer-key")?;
                Ok(Transport::WireGuard {
                    private_key,
                    peers: vec![PeerConfig {
                        public_key,
                        preshared_key: None,
                        endpoint: self.peer_endpoint,
                        keepalive: self.keepalive_interval,
                        allowed_ips: PeerConfig::allow_all(),
                    }],
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=";
    const PEER: &str = "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=";

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("wgslirpy").chain(args.iter().copied()))?;
        cli.gateway.into_config()
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

    #[test]
    fn help_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
