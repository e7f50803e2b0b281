//! `wgslirpy init` and `wgslirpy add-peer`: a working gateway and its
//! peers' configurations in one step each.
//!
//! # Addressing plan inside the tunnel
//!
//! | who | IPv4 | IPv6 |
//! |---|---|---|
//! | the gateway (pingable, DNS on port 53) | 10.0.2.1 | fd00::1 |
//! | peer number n (2 to 254, lowest free first) | 10.0.2.n/32 | fd00::n/128 |
//!
//! Each peer's `AllowedIPs` in the gateway file are its two host routes, so
//! the gateway accepts only those sources from it and routes replies for
//! them to it. The peer's own config routes everything (`0.0.0.0/0, ::/0`)
//! to the gateway.
//!
//! The gateway file is written with mode 0600 (it holds the gateway's
//! private key) and never replaced without `--force`; `add-peer` appends a
//! `[Peer]` section through a temporary file and a rename. Peer private
//! keys are printed, never stored.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use libwgslirpy::config::Key;
use libwgslirpy::config_file::{ConfigFile, split_host_port};
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;

/// The gateway's IPv4 address inside the tunnel.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The gateway's IPv6 address inside the tunnel.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// Persistent keepalive in peer configs: keeps NAT mappings open.
const PEER_KEEPALIVE: u16 = 25;

/// A peer just added to a gateway file.
#[derive(Debug)]
pub struct NewPeer {
    /// Its number in the addressing plan.
    pub number: u8,
    /// Its ready-to-import wg-quick config, private key included.
    pub config: String,
}

impl NewPeer {
    /// The config as a QR code of Unicode half blocks, light on dark (as
    /// `qrencode -t utf8` draws it), with the quiet zone.
    pub fn qr_code(&self) -> anyhow::Result<String> {
        Ok(QrCode::new(self.config.as_bytes())
            .context("the peer config does not fit in a QR code")?
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build())
    }
}

/// The two addresses of peer number `n`.
fn peer_addresses(n: u8) -> (Ipv4Addr, Ipv6Addr) {
    let [a, b, c, _] = GATEWAY_V4.octets();
    let v6 = GATEWAY_V6.segments();
    (
        Ipv4Addr::new(a, b, c, n),
        Ipv6Addr::new(v6[0], v6[1], v6[2], v6[3], v6[4], v6[5], v6[6], n.into()),
    )
}

/// `wgslirpy init`: writes a new gateway file at `path` with one peer, and
/// returns that peer.
pub fn init(path: &Path, endpoint: &str, force: bool) -> anyhow::Result<NewPeer> {
    let (_, port) = split_host_port(endpoint).map_err(|why| anyhow!("--endpoint: {why}"))?;
    let gateway_key = Key::generate_private();
    let peer_key = Key::generate_private();
    let number = 2;
    let mut text = format!(
        "# wgslirpy gateway, written by `wgslirpy init`. Start it with:\n\
         #   wgslirpy -c {path}\n\
         # Add a peer with: wgslirpy add-peer -c {path} --name NAME\n\
         # Inside the tunnel the gateway is {GATEWAY_V4} and {GATEWAY_V6};\n\
         # peer n is 10.0.2.n and fd00::n.\n\
         \n\
         [Interface]\n\
         PrivateKey = {private}\n\
         ListenPort = {port}\n\
         \n\
         [wgslirpy]\n\
         Bind = [::]:{port}\n\
         DNS = {GATEWAY_V4}:53\n\
         Pingable = {GATEWAY_V4}, {GATEWAY_V6}\n\
         PublicEndpoint = {endpoint}\n",
        path = path.display(),
        private = gateway_key.to_base64(),
    );
    text.push_str(&peer_section(&peer_key.public_key(), number, None));
    write_new(path, &text, force)?;
    Ok(NewPeer {
        number,
        config: peer_config(
            &peer_key,
            number,
            &gateway_key.public_key(),
            endpoint,
            Some(GATEWAY_V4.into()),
        ),
    })
}

/// `wgslirpy add-peer`: adds a peer with the next free addresses to the
/// gateway file at `path`, and returns it. `endpoint` overrides the file's
/// `PublicEndpoint`.
pub fn add_peer(
    path: &Path,
    name: Option<&str>,
    endpoint: Option<&str>,
) -> anyhow::Result<NewPeer> {
    if let Some(name) = name
        && name.contains(|c: char| c.is_control())
    {
        bail!("--name must be a single line");
    }
    let file = ConfigFile::load(path)?;
    let gateway_key = file.private_key.with_context(|| {
        format!(
            "{}: no PrivateKey in [Interface]; is it a gateway file made by `wgslirpy init`?",
            path.display()
        )
    })?;
    let endpoint = match endpoint.or(file.settings.public_endpoint.as_deref()) {
        Some(endpoint) => endpoint.to_owned(),
        None => bail!(
            "{}: no PublicEndpoint in [wgslirpy]; give --endpoint HOST:PORT",
            path.display()
        ),
    };
    split_host_port(&endpoint).map_err(|why| anyhow!("--endpoint: {why}"))?;
    let number = next_free(&file)
        .with_context(|| format!("{}: all 253 peer addresses are taken", path.display()))?;
    let peer_key = Key::generate_private();

    let mut text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&peer_section(&peer_key.public_key(), number, name));
    replace(path, &text)?;
    Ok(NewPeer {
        number,
        config: peer_config(
            &peer_key,
            number,
            &gateway_key.public_key(),
            &endpoint,
            file.settings.dns.map(|dns| dns.ip()),
        ),
    })
}

/// The lowest peer number whose addresses no peer of `file` holds (routes
/// to everything, `/0`, do not count).
fn next_free(file: &ConfigFile) -> Option<u8> {
    let taken = |ip: IpAddr| {
        file.peers.iter().any(|peer| {
            peer.allowed_ips
                .iter()
                .any(|net| net.prefix() > 0 && net.contains(ip))
        })
    };
    (2..=254).find(|&n| {
        let (v4, v6) = peer_addresses(n);
        !taken(v4.into()) && !taken(v6.into())
    })
}

/// The gateway file's `[Peer]` section for peer `number`.
fn peer_section(public_key: &Key, number: u8, name: Option<&str>) -> String {
    let (v4, v6) = peer_addresses(number);
    let name = name.map_or(String::new(), |name| format!("# Name = {name}\n"));
    format!(
        "\n{name}[Peer]\nPublicKey = {}\nAllowedIPs = {v4}/32, {v6}/128\n",
        public_key.to_base64()
    )
}

/// The peer's own wg-quick config.
fn peer_config(
    private_key: &Key,
    number: u8,
    gateway_public: &Key,
    endpoint: &str,
    dns: Option<IpAddr>,
) -> String {
    let (v4, v6) = peer_addresses(number);
    let dns = dns.map_or(String::new(), |dns| format!("DNS = {dns}\n"));
    format!(
        "[Interface]\n\
         PrivateKey = {}\n\
         Address = {v4}/32, {v6}/128\n\
         {dns}\
         \n\
         [Peer]\n\
         PublicKey = {}\n\
         Endpoint = {endpoint}\n\
         AllowedIPs = 0.0.0.0/0, ::/0\n\
         PersistentKeepalive = {PEER_KEEPALIVE}\n",
        private_key.to_base64(),
        gateway_public.to_base64(),
    )
}

/// Writes a new file with mode 0600; an existing one only with `force`.
fn write_new(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == io::ErrorKind::AlreadyExists {
            anyhow!(
                "{} already exists; use --force to overwrite it",
                path.display()
            )
        } else {
            anyhow!(error).context(format!("cannot write {}", path.display()))
        }
    })?;
    // An overwritten file keeps its old mode unless told.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces `path` with `text` (mode 0600) through a temporary file and a
/// rename, so that a failure leaves the old file whole.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut temporary = PathBuf::from(path);
    temporary.as_mut_os_string().push(".tmp");
    write_new(&temporary, text, true)?;
    fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests;
