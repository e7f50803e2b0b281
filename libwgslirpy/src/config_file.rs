//! Configuration files in WireGuard's own format, plus a section of ours.
//!
//! # Theory of operation
//!
//! A file for `wg setconf` or `wg-quick` works unchanged:
//! - `[Interface]`: `PrivateKey`, `ListenPort`. `wg-quick`'s own keys
//!   (`Address`, `DNS`, `MTU`, `Table`, `PreUp`, `PostUp`, `PreDown`,
//!   `PostDown`, `SaveConfig`) describe the local interface, which we do not
//!   have: they are accepted and ignored (logged at debug level). `FwMark` is
//!   accepted and ignored with a warning.
//! - `[Peer]`, once per peer: `PublicKey` (required), `PresharedKey`,
//!   `Endpoint` (`host:port`, IPv6 as `[addr]:port`; a host name is resolved
//!   once, when the file is loaded), `AllowedIPs`, `PersistentKeepalive`
//!   (seconds, or `off`).
//! - `[wgslirpy]`, ours: router settings, named as the long command-line
//!   flags (`Bind`, `DNS`, `Pingable`, `MTU`, …; see [`SETTINGS`]).
//!
//! Lines are read as wireguard-tools' `config.c` reads them: `#` starts a
//! comment; blank lines are skipped; section names and keys are
//! case-insensitive; whitespace anywhere in a line is ignored (in
//! `[wgslirpy]` only around the value, so that paths may hold spaces).
//! `AllowedIPs` (and our `Pingable`) take comma lists and accumulate when
//! repeated; for other keys the last one wins. An address without a prefix
//! length in `AllowedIPs` means `/32` or `/128`.
//!
//! Stricter than `wg`: an unknown key, a key outside a section, a second
//! `[Peer]` with the same public key, and `Bind` and `ListenPort` with
//! different ports are errors. Every error names the file, the line and the
//! key: `wg0.conf:7: PublicKey: invalid key: …`.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::config::{Config, Forward, Key, PeerConfig};
use crate::core::policy::{Rule, RuleError};

/// A parsed configuration file.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// The file's path, as given (used in messages).
    pub path: PathBuf,
    /// `[Interface] PrivateKey`.
    pub private_key: Option<Key>,
    /// `[Interface] ListenPort`.
    pub listen_port: Option<u16>,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerConfig>,
    /// The `[wgslirpy]` section.
    pub settings: RouterSettings,
}

/// Router settings from the `[wgslirpy]` section. `None` (or empty) means
/// the file does not set it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterSettings {
    /// `Bind`: the tunnel's local UDP address (`-b`).
    pub bind: Option<SocketAddr>,
    /// `DNS`: the in-tunnel DNS address (`-D`); a bare IP means port 53.
    pub dns: Option<SocketAddr>,
    /// `Pingable`: in-tunnel addresses that answer pings (`-P`).
    pub pingable: Vec<IpAddr>,
    /// `MTU`: the tunnel MTU (`--mtu`).
    pub mtu: Option<u16>,
    /// `TcpBufferSize` (`--tcp-buffer-size`).
    pub tcp_buffer_size: Option<usize>,
    /// `TransmitQueueCapacity` (`--transmit-queue-capacity`).
    pub transmit_queue_capacity: Option<usize>,
    /// `TunnelSocketBuffer` (`--tunnel-socket-buffer`).
    pub tunnel_socket_buffer: Option<usize>,
    /// `MaxUdpFlows` (`--max-udp-flows`).
    pub max_udp_flows: Option<usize>,
    /// `UdpIdleTimeout`, in seconds (`--udp-idle-timeout`).
    pub udp_idle_timeout: Option<Duration>,
    /// `IncomingUdp`, one triplet per line (`-u`).
    pub incoming_udp: Vec<Forward>,
    /// `IncomingTcp`, one triplet per line (`-t`).
    pub incoming_tcp: Vec<Forward>,
    /// `UapiSocket` (`--uapi-socket`).
    pub uapi_socket: Option<PathBuf>,
    /// `Metrics`, an IP:PORT (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// `Allow`, one rule per line (`--allow`).
    pub allow: Vec<Rule>,
    /// `Deny`, one rule per line (`--deny`).
    pub deny: Vec<Rule>,
    /// `HostAddress` (`--host-address`).
    pub host_address: Option<IpAddr>,
    /// `DnsTimeout`, in seconds (`--dns-timeout`).
    pub dns_timeout: Option<Duration>,
    /// `MaxDnsQueries` (`--max-dns-queries`).
    pub max_dns_queries: Option<usize>,
    /// `ResolverThreads` (`--resolver-threads`).
    pub resolver_threads: Option<usize>,
    /// `MaxTcpConnections` (`--max-tcp-connections`).
    pub max_tcp_connections: Option<usize>,
    /// `MaxTcpPendingConnects` (`--max-tcp-pending-connects`).
    pub max_tcp_pending_connects: Option<usize>,
    /// `TcpConnectTimeout`, in seconds (`--tcp-connect-timeout`).
    pub tcp_connect_timeout: Option<Duration>,
    /// `TcpIdleTimeout`, in seconds (`--tcp-idle-timeout`).
    pub tcp_idle_timeout: Option<Duration>,
    /// `MaxReassemblyBytes` (`--max-reassembly-bytes`).
    pub max_reassembly_bytes: Option<usize>,
    /// `MaxIcmpIds` (`--max-icmp-ids`).
    pub max_icmp_ids: Option<usize>,
    /// `PublicEndpoint`: `HOST:PORT` where peers reach this gateway. The
    /// router ignores it; `wgslirpy add-peer` writes it into peer configs.
    pub public_endpoint: Option<String>,
}

/// How one `[wgslirpy]` key is parsed into [`RouterSettings`].
type Setter = fn(&mut RouterSettings, &str) -> Result<(), String>;

/// Every key of the `[wgslirpy]` section: its name (matched
/// case-insensitively) and how its value is stored. To add a setting, add a
/// field to [`RouterSettings`], a line here, and a line in
/// [`RouterSettings::apply`].
pub const SETTINGS: &[(&str, Setter)] = &[
    ("Bind", |s, v| set(&mut s.bind, v, "an IP:PORT")),
    ("DNS", |s, v| {
        let ip_only = v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53));
        s.dns = Some(ip_only.or_else(|_| parse(v, "an IP or IP:PORT"))?);
        Ok(())
    }),
    ("Pingable", |s, v| {
        for item in list(v)? {
            s.pingable.push(parse(item, "an IP address")?);
        }
        Ok(())
    }),
    ("MTU", |s, v| set(&mut s.mtu, v, "a number of bytes")),
    ("TcpBufferSize", |s, v| {
        set(&mut s.tcp_buffer_size, v, "a number of bytes")
    }),
    ("TransmitQueueCapacity", |s, v| {
        set(&mut s.transmit_queue_capacity, v, "a number of packets")
    }),
    ("TunnelSocketBuffer", |s, v| {
        set(&mut s.tunnel_socket_buffer, v, "a number of bytes")
    }),
    ("MaxUdpFlows", |s, v| {
        set(&mut s.max_udp_flows, v, "a number of flows")
    }),
    ("UdpIdleTimeout", |s, v| seconds(&mut s.udp_idle_timeout, v)),
    ("DnsTimeout", |s, v| seconds(&mut s.dns_timeout, v)),
    ("MaxDnsQueries", |s, v| {
        set(&mut s.max_dns_queries, v, "a number of queries")
    }),
    ("ResolverThreads", |s, v| {
        set(&mut s.resolver_threads, v, "a number of threads")
    }),
    ("MaxTcpConnections", |s, v| {
        set(&mut s.max_tcp_connections, v, "a number of connections")
    }),
    ("MaxTcpPendingConnects", |s, v| {
        set(
            &mut s.max_tcp_pending_connects,
            v,
            "a number of connections",
        )
    }),
    ("TcpConnectTimeout", |s, v| {
        seconds(&mut s.tcp_connect_timeout, v)
    }),
    ("TcpIdleTimeout", |s, v| seconds(&mut s.tcp_idle_timeout, v)),
    ("MaxReassemblyBytes", |s, v| {
        set(&mut s.max_reassembly_bytes, v, "a number of bytes")
    }),
    ("MaxIcmpIds", |s, v| {
        set(&mut s.max_icmp_ids, v, "a number of identities")
    }),
    ("Allow", |s, v| {
        s.allow
            .push(v.parse().map_err(|e: RuleError| e.to_string())?);
        Ok(())
    }),
    ("Deny", |s, v| {
        s.deny
            .push(v.parse().map_err(|e: RuleError| e.to_string())?);
        Ok(())
    }),
    ("HostAddress", |s, v| {
        set(&mut s.host_address, v, "an IP address")
    }),
    ("IncomingUdp", |s, v| {
        s.incoming_udp.push(
            v.parse()
                .map_err(|e: crate::config::ConfigError| e.to_string())?,
        );
        Ok(())
    }),
    ("IncomingTcp", |s, v| {
        s.incoming_tcp.push(
            v.parse()
                .map_err(|e: crate::config::ConfigError| e.to_string())?,
        );
        Ok(())
    }),
    ("Metrics", |s, v| set(&mut s.metrics, v, "an IP:PORT")),
    ("UapiSocket", |s, v| {
        s.uapi_socket = Some(PathBuf::from(v));
        Ok(())
    }),
    ("PublicEndpoint", |s, v| {
        split_host_port(v)?;
        s.public_endpoint = Some(v.to_owned());
        Ok(())
    }),
];

/// The keys `wg` itself knows, in `[Interface]` and `[Peer]`.
const WG_KEYS: &[&str] = &[
    "PrivateKey",
    "ListenPort",
    "FwMark",
    "PublicKey",
    "PresharedKey",
    "Endpoint",
    "AllowedIPs",
    "PersistentKeepalive",
];

/// `wg-quick`'s `[Interface]` keys: they configure the local interface,
/// which wgslirpy does not have.
const WG_QUICK_ONLY: &[&str] = &[
    "Address",
    "DNS",
    "MTU",
    "Table",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
    "SaveConfig",
];

impl RouterSettings {
    /// Sets on `config` every setting the file gives, except `Bind` (see
    /// [`ConfigFile::bind`]) and `PublicEndpoint`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(dns) = self.dns {
            config.dns = Some(dns);
        }
        if !self.pingable.is_empty() {
            config.pingable.clone_from(&self.pingable);
        }
        if let Some(mtu) = self.mtu {
            config.mtu = mtu;
        }
        if let Some(size) = self.tcp_buffer_size {
            config.tcp_buffer_size = size;
        }
        if let Some(capacity) = self.transmit_queue_capacity {
            config.transmit_queue_capacity = capacity;
        }
        if let Some(flows) = self.max_udp_flows {
            config.max_udp_flows = flows;
        }
        if let Some(timeout) = self.udp_idle_timeout {
            config.udp_idle_timeout = timeout;
        }
        if !self.incoming_udp.is_empty() {
            config.incoming_udp.clone_from(&self.incoming_udp);
        }
        if !self.incoming_tcp.is_empty() {
            config.incoming_tcp.clone_from(&self.incoming_tcp);
        }
        if let Some(path) = &self.uapi_socket {
            config.uapi_socket = Some(path.clone());
        }
        if let Some(addr) = self.metrics {
            config.metrics = Some(addr);
        }
        if !self.allow.is_empty() {
            config.allow.clone_from(&self.allow);
        }
        if !self.deny.is_empty() {
            config.deny.clone_from(&self.deny);
        }
        if let Some(ip) = self.host_address {
            config.host_address = Some(ip);
        }
        let limits = [
            (self.max_dns_queries, &mut config.max_dns_queries),
            (self.resolver_threads, &mut config.resolver_threads),
            (self.max_tcp_connections, &mut config.max_tcp_connections),
            (
                self.max_tcp_pending_connects,
                &mut config.max_tcp_pending_connects,
            ),
            (self.max_reassembly_bytes, &mut config.max_reassembly_bytes),
            (self.tunnel_socket_buffer, &mut config.tunnel_socket_buffer),
            (self.max_icmp_ids, &mut config.max_icmp_ids),
        ];
        for (value, slot) in limits {
            if let Some(value) = value {
                *slot = value;
            }
        }
        let timeouts = [
            (self.dns_timeout, &mut config.dns_timeout),
            (self.tcp_connect_timeout, &mut config.tcp_connect_timeout),
            (self.tcp_idle_timeout, &mut config.tcp_idle_timeout),
        ];
        for (value, slot) in timeouts {
            if let Some(value) = value {
                *slot = value;
            }
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A line is wrong.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong, starting with the key when there is one.
        message: String,
    },
}

impl ConfigFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` is only used in messages. Host names in
    /// `Endpoint` are resolved here.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigFileError> {
        let mut parser = Parser {
            file: ConfigFile {
                path: path.to_owned(),
                private_key: None,
                listen_port: None,
                peers: Vec::new(),
                settings: RouterSettings::default(),
            },
            section: Section::None,
            peer_lines: Vec::new(),
            bind_line: 0,
        };
        let error = |line: usize, message: String| ConfigFileError::Line {
            path: path.to_owned(),
            line,
            message,
        };
        for (index, raw) in text.lines().enumerate() {
            parser
                .line(raw, index + 1)
                .map_err(|message| error(index + 1, message))?;
        }
        parser
            .finish()
            .map_err(|(line, message)| error(line, message))
    }

    /// Where the tunnel socket binds, per this file: `Bind`, or else
    /// `[::]:ListenPort` (dual-stack), or `None`.
    pub fn bind(&self) -> Option<SocketAddr> {
        self.settings.bind.or_else(|| {
            self.listen_port
                .map(|port| SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port))
        })
    }
}

/// The section the parser is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    /// Before the first section header.
    None,
    Interface,
    Peer,
    Wgslirpy,
}

/// What is wrong with a `[Interface]` or `[Peer]` line.
enum Problem {
    /// The key is not one of the section's.
    UnknownKey,
    /// The value is wrong: why.
    Value(String),
}

impl From<String> for Problem {
    fn from(why: String) -> Self {
        Problem::Value(why)
    }
}

/// Line-by-line parser state.
struct Parser {
    /// What has been read so far.
    file: ConfigFile,
    section: Section,
    /// For each peer, the line of its `[Peer]` header and whether it has a
    /// `PublicKey` yet (peers are pushed with a placeholder key).
    peer_lines: Vec<(usize, bool)>,
    /// Line of the last `Bind`, for the ListenPort cross-check.
    bind_line: usize,
}

impl Parser {
    /// Handles line `line_no` (from 1). Errors are messages without the
    /// location.
    fn line(&mut self, raw: &str, line_no: usize) -> Result<(), String> {
        let uncommented = raw.split('#').next().unwrap_or("");
        let squeezed: String = uncommented.chars().filter(|c| !c.is_whitespace()).collect();
        if squeezed.is_empty() {
            return Ok(());
        }
        if squeezed.starts_with('[') {
            return self.header(&squeezed, line_no);
        }
        let Some((key, value)) = squeezed.split_once('=') else {
            return Err(format!(
                "expected `Key = Value` or a [Section], found `{}`",
                raw.trim()
            ));
        };
        if self.section == Section::Wgslirpy {
            // Only the key is squeezed here: values may be paths with spaces.
            let value = uncommented.split_once('=').map_or("", |(_, v)| v.trim());
            return self.setting(key, value, line_no);
        }
        if self.section == Section::None {
            return Err(format!(
                "`{key}` is outside any section; start with [Interface] or [Peer]"
            ));
        }
        let name = WG_KEYS
            .iter()
            .chain(WG_QUICK_ONLY)
            .find(|name| key.eq_ignore_ascii_case(name))
            .copied()
            .unwrap_or(key);
        if value.is_empty() {
            return Err(format!("{name}: empty value"));
        }
        let result = if self.section == Section::Interface {
            self.interface(name, value)
        } else {
            self.peer(name, value)
        };
        result.map_err(|why| match why {
            Problem::UnknownKey => {
                let section = if self.section == Section::Interface {
                    "[Interface]"
                } else {
                    "[Peer]"
                };
                format!("unknown key `{key}` in {section}")
            }
            Problem::Value(why) => format!("{name}: {why}"),
        })
    }

    fn header(&mut self, header: &str, line_no: usize) -> Result<(), String> {
        self.section = match header.to_ascii_lowercase().as_str() {
            "[interface]" => Section::Interface,
            "[peer]" => {
                self.file
                    .peers
                    .push(PeerConfig::new(Key([0; 32]), Vec::new()));
                self.peer_lines.push((line_no, false));
                Section::Peer
            }
            "[wgslirpy]" => Section::Wgslirpy,
            _ => {
                return Err(format!(
                    "unknown section `{header}` (expected [Interface], [Peer] or [wgslirpy])"
                ));
            }
        };
        Ok(())
    }

    /// One `[Interface]` line; `key` is spelled canonically if known.
    fn interface(&mut self, key: &str, value: &str) -> Result<(), Problem> {
        if key.eq_ignore_ascii_case("PrivateKey") {
            self.file.private_key = Some(key_value(value)?);
        } else if key.eq_ignore_ascii_case("ListenPort") {
            self.file.listen_port = Some(parse(value, "a port number")?);
        } else if key.eq_ignore_ascii_case("FwMark") {
            tracing::warn!(file = %self.file.path.display(), "FwMark is not supported; ignored");
        } else if let Some(name) = WG_QUICK_ONLY
            .iter()
            .find(|name| key.eq_ignore_ascii_case(name))
        {
            tracing::debug!(
                file = %self.file.path.display(),
                key = name,
                "wg-quick interface setting ignored: wgslirpy has no local interface"
            );
        } else {
            return Err(Problem::UnknownKey);
        }
        Ok(())
    }

    /// One `[Peer]` line; `key` is spelled canonically if known.
    fn peer(&mut self, key: &str, value: &str) -> Result<(), Problem> {
        let index = self.file.peers.len() - 1;
        if key.eq_ignore_ascii_case("PublicKey") {
            let public_key = key_value(value)?;
            if let Some(other) = self.file.peers[..index]
                .iter()
                .position(|p| p.public_key == public_key)
            {
                return Err(Problem::Value(format!(
                    "this peer is already defined by the [Peer] at line {}",
                    self.peer_lines[other].0
                )));
            }
            self.file.peers[index].public_key = public_key;
            self.peer_lines[index].1 = true;
            return Ok(());
        }
        let peer = &mut self.file.peers[index];
        if key.eq_ignore_ascii_case("PresharedKey") {
            peer.preshared_key = Some(key_value(value)?);
        } else if key.eq_ignore_ascii_case("Endpoint") {
            peer.endpoint = Some(endpoint(value)?);
        } else if key.eq_ignore_ascii_case("AllowedIPs") {
            for item in list(value)? {
                peer.allowed_ips.push(allowed_ip(item)?);
            }
        } else if key.eq_ignore_ascii_case("PersistentKeepalive") {
            peer.keepalive = if value.eq_ignore_ascii_case("off") {
                None
            } else {
                Some(parse::<u16>(
                    value,
                    "a number of seconds (0-65535) or `off`",
                )?)
                .filter(|&seconds| seconds != 0)
            };
        } else {
            return Err(Problem::UnknownKey);
        }
        Ok(())
    }

    fn setting(&mut self, key: &str, value: &str, line_no: usize) -> Result<(), String> {
        let Some((name, setter)) = SETTINGS
            .iter()
            .find(|(name, _)| key.eq_ignore_ascii_case(name))
        else {
            return Err(format!("unknown key `{key}` in [wgslirpy]"));
        };
        if value.is_empty() {
            return Err(format!("{name}: empty value"));
        }
        if *name == "Bind" {
            self.bind_line = line_no;
        }
        setter(&mut self.file.settings, value).map_err(|why| format!("{name}: {why}"))
    }

    /// Checks what needs the whole file: every peer has a key, and `Bind`
    /// agrees with `ListenPort`.
    fn finish(self) -> Result<ConfigFile, (usize, String)> {
        if let Some((line, _)) = self.peer_lines.iter().find(|(_, has_key)| !has_key) {
            return Err((*line, "[Peer] section has no PublicKey".into()));
        }
        if let (Some(bind), Some(port)) = (self.file.settings.bind, self.file.listen_port)
            && bind.port() != port
        {
            return Err((
                self.bind_line,
                format!(
                    "Bind: port {} differs from [Interface] ListenPort = {port}",
                    bind.port()
                ),
            ));
        }
        Ok(self.file)
    }
}

/// Parses `value` as a `T`, or says that it is not `what`.
fn parse<T: FromStr>(value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("`{value}` is not {what}"))
}

/// Parses `value` into `slot`.
fn set<T: FromStr>(slot: &mut Option<T>, value: &str, what: &str) -> Result<(), String> {
    *slot = Some(parse(value, what)?);
    Ok(())
}

/// Parses a whole number of seconds, at least 1, into `slot`.
fn seconds(slot: &mut Option<Duration>, value: &str) -> Result<(), String> {
    match parse::<u64>(value, "a number of seconds")? {
        0 => Err("it must be at least 1 second".into()),
        seconds => {
            *slot = Some(Duration::from_secs(seconds));
            Ok(())
        }
    }
}

/// Splits a comma list; empty items are errors, as in `wg`.
fn list(value: &str) -> Result<impl Iterator<Item = &str>, String> {
    if value.split(',').any(|item| item.trim().is_empty()) {
        return Err(format!("empty item in the list `{value}`"));
    }
    Ok(value.split(',').map(str::trim))
}

/// A base64 key.
fn key_value(value: &str) -> Result<Key, String> {
    Key::from_base64(value).map_err(|error| error.to_string())
}

/// One `AllowedIPs` item: `IP/PREFIX`, or a bare IP meaning `/32` or `/128`.
fn allowed_ip(item: &str) -> Result<IpNetwork, String> {
    let network = match item.split_once('/') {
        Some((ip, prefix)) => {
            let ip: IpAddr = parse(ip, "an IP address")?;
            let prefix: u8 = parse(prefix, "a prefix length")?;
            IpNetwork::new(ip, prefix).map_err(|_| format!("`{item}`: prefix too long"))?
        }
        None => IpNetwork::from(parse::<IpAddr>(item, "an IP address or IP/PREFIX")?),
    };
    if network.ip() != network.network() {
        // `wg` warns and keeps it too; the host part is masked off when routing.
        tracing::warn!(
            allowed_ip = item,
            "AllowedIPs entry has a non-zero host part"
        );
    }
    Ok(network)
}

/// Splits `HOST:PORT` (IPv6 as `[addr]:port`) into its parts.
pub fn split_host_port(value: &str) -> Result<(&str, u16), String> {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("`{value}`: no `]` after the IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("`{value}`: no port"))?;
            (host, port)
        }
        None => value
            .rsplit_once(':')
            .ok_or_else(|| format!("`{value}`: no port (expected HOST:PORT)"))?,
    };
    if host.is_empty() {
        return Err(format!("`{value}`: no host"));
    }
    Ok((host, parse(port, "a port number")?))
}

/// An `Endpoint`: an IP literal, or a host name resolved now.
fn endpoint(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = split_host_port(value)?;
    (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve `{host}`: {error}"))?
        .next()
        .ok_or_else(|| format!("`{host}` has no address"))
}

#[cfg(test)]
mod tests;
