//! `init` and `add-peer` on real files in a private temporary directory.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicU32, Ordering};

use libwgslirpy::config_file::ConfigFile;

use super::*;

/// A fresh empty directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wgslirpy-setup-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Allowed IPs as text, for comparing.
fn nets(allowed: &[impl ToString]) -> Vec<String> {
    allowed.iter().map(ToString::to_string).collect()
}

/// Parses a peer's wg-quick config with our own parser and returns it.
fn parse_peer(config: &str) -> ConfigFile {
    ConfigFile::parse(config, Path::new("peer.conf")).unwrap_or_else(|e| panic!("{e}\n{config}"))
}

#[test]
fn init_writes_a_gateway_file_that_parses_and_a_matching_peer_config() {
    let dir = TempDir::new();
    let path = dir.join("wgslirpy.conf");
    let peer = init(&path, "vpn.example.com:51820", false).unwrap();
    assert_eq!(mode(&path), 0o600);

    let gateway = ConfigFile::load(&path).unwrap();
    let gateway_key = gateway.private_key.expect("gateway private key");
    assert_eq!(gateway.listen_port, Some(51820));
    assert_eq!(gateway.bind(), Some("[::]:51820".parse().unwrap()));
    let s = &gateway.settings;
    assert_eq!(s.dns, Some("10.0.2.1:53".parse().unwrap()));
    assert_eq!(
        s.pingable,
        [IpAddr::from(GATEWAY_V4), IpAddr::from(GATEWAY_V6)]
    );
    assert_eq!(s.public_endpoint.as_deref(), Some("vpn.example.com:51820"));
    assert_eq!(gateway.peers.len(), 1);
    assert_eq!(
        nets(&gateway.peers[0].allowed_ips),
        ["10.0.2.2/32", "fd00::2/128"]
    );

    // The peer's config is what wg-quick wants, and the keys pair up.
    assert_eq!(peer.number, 2);
    let text = &peer.config;
    for line in [
        "Address = 10.0.2.2/32, fd00::2/128",
        "DNS = 10.0.2.1",
        "Endpoint = vpn.example.com:51820",
        "AllowedIPs = 0.0.0.0/0, ::/0",
        "PersistentKeepalive = 25",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    // A host name is resolved when a file is loaded; swap in an IP literal so
    // that the test makes no DNS query.
    let parsed = parse_peer(&text.replace("vpn.example.com", "192.0.2.1"));
    let peer_private = parsed.private_key.expect("peer private key");
    assert_eq!(peer_private.public_key(), gateway.peers[0].public_key);
    assert_eq!(parsed.peers.len(), 1);
    assert_eq!(parsed.peers[0].public_key, gateway_key.public_key());
    assert_eq!(
        parsed.peers[0].endpoint,
        Some("192.0.2.1:51820".parse().unwrap())
    );
    assert_eq!(parsed.peers[0].keepalive, Some(25));
    assert_eq!(nets(&parsed.peers[0].allowed_ips), ["0.0.0.0/0", "::/0"]);
}

#[test]
fn init_never_overwrites_without_force() {
    let dir = TempDir::new();
    let path = dir.join("gw.conf");
    fs::write(&path, "precious").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let error = init(&path, "192.0.2.1:51820", false).unwrap_err();
    assert_eq!(
        format!("{error:#}"),
        format!(
            "{} already exists; use --force to overwrite it",
            path.display()
        )
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");

    init(&path, "192.0.2.1:51820", true).unwrap();
    assert!(ConfigFile::load(&path).unwrap().private_key.is_some());
    assert_eq!(
        mode(&path),
        0o600,
        "an overwritten file is made private too"
    );
}

#[test]
fn init_rejects_an_endpoint_without_port() {
    let dir = TempDir::new();
    let path = dir.join("gw.conf");
    let error = init(&path, "vpn.example.com", false).unwrap_err();
    assert!(error.to_string().starts_with("--endpoint: "), "{error}");
    assert!(!path.exists());
}

#[test]
fn add_peer_takes_the_next_free_addresses_and_keeps_the_file() {
    let dir = TempDir::new();
    let path = dir.join("gw.conf");
    init(&path, "[2001:db8::1]:4500", false).unwrap();
    let before = fs::read_to_string(&path).unwrap();

    let third = add_peer(&path, Some("phone"), None).unwrap();
    assert_eq!(third.number, 3);
    let after = fs::read_to_string(&path).unwrap();
    assert!(after.starts_with(&before), "add-peer must only append");
    assert!(after.contains("\n# Name = phone\n[Peer]\n"), "{after}");
    assert_eq!(mode(&path), 0o600);
    assert!(third.config.contains("Address = 10.0.2.3/32, fd00::3/128"));
    assert!(third.config.contains("Endpoint = [2001:db8::1]:4500"));

    let gateway = ConfigFile::load(&path).unwrap();
    assert_eq!(gateway.peers.len(), 2);
    let parsed = parse_peer(&third.config);
    assert_eq!(
        parsed.private_key.unwrap().public_key(),
        gateway.peers[1].public_key
    );
    assert_eq!(
        nets(&gateway.peers[1].allowed_ips),
        ["10.0.2.3/32", "fd00::3/128"]
    );

    // A gap left by a removed peer is filled first.
    let text = after.replace("10.0.2.2/32, fd00::2/128", "10.0.2.9/32, fd00::9/128");
    fs::write(&path, text).unwrap();
    assert_eq!(add_peer(&path, None, None).unwrap().number, 2);
    assert_eq!(add_peer(&path, None, None).unwrap().number, 4);
}

#[test]
fn add_peer_errors() {
    let dir = TempDir::new();
    let missing = dir.join("missing.conf");
    let error = add_peer(&missing, None, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("cannot read {}", missing.display())
    );

    let no_endpoint = dir.join("plain.conf");
    let key = Key::generate_private().to_base64();
    fs::write(&no_endpoint, format!("[Interface]\nPrivateKey = {key}\n")).unwrap();
    let error = add_peer(&no_endpoint, None, None).unwrap_err();
    assert!(error.to_string().contains("give --endpoint"), "{error}");
    let peer = add_peer(&no_endpoint, None, Some("192.0.2.1:51820")).unwrap();
    assert_eq!(peer.number, 2);

    let error = add_peer(&no_endpoint, Some("two\nlines"), None).unwrap_err();
    assert_eq!(error.to_string(), "--name must be a single line");
}

#[test]
fn qr_code_encodes_the_config() {
    let peer = NewPeer {
        number: 2,
        config: "[Interface]\nPrivateKey = x\n".into(),
    };
    let qr = peer.qr_code().unwrap();
    let expected = QrCode::new(peer.config.as_bytes()).unwrap();
    // Two modules per character row, plus a 4-module quiet zone each side.
    let side = expected.width() + 8;
    let rows: Vec<&str> = qr.lines().collect();
    assert_eq!(rows.len(), side.div_ceil(2));
    assert!(rows.iter().all(|row| row.chars().count() == side));
    assert!(
        qr.chars()
            .all(|c| " \u{2580}\u{2584}\u{2588}\n".contains(c)),
        "only half blocks: {qr}"
    );
}
