//! Tests of `-c`, `init` and `add-peer` through the binary, without root: one-line errors
//! naming the file and line, files written private and never overwritten, the QR code, and
//! a gateway started from an `init` file with `-b` on top. Binds to 127.0.0.1 only.

mod rig;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use rig::{CmdOutput, Proc, Proto, bound_sockets, run_timeout, signals_caught, wait_until};

const GW_PRIVATE: &str = "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=";
const PEER_PUBLIC: &str = "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=";

/// A fresh directory for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wgs-cli-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `text` to `name` in the directory and returns its path as text.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn wgslirpy(args: &[&str]) -> CmdOutput {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgslirpy"));
    c.args(args).env_remove("RUST_LOG");
    run_timeout(c, Duration::from_secs(5))
}

/// Runs wgslirpy with `args` and expects exit code 1 within 1 s and exactly `line` on
/// stderr (after the `wgslirpy: error: ` prefix), alone.
#[track_caller]
fn assert_one_line_error(args: &[&str], line: &str) {
    let out = wgslirpy(args);
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.elapsed < Duration::from_secs(1), "slow to fail: {out}");
    assert_eq!(out.stderr, format!("wgslirpy: error: {line}\n"), "{out}");
}

#[test]
fn bad_config_files_give_one_line_naming_file_and_line() {
    let dir = TempDir::new();
    let bad_key = dir.file(
        "bad-key.conf",
        "[Interface]\n# the gateway\nPrivateKey = not-a-key!\n",
    );
    assert_one_line_error(
        &["-c", &bad_key],
        &format!("{bad_key}:3: PrivateKey: invalid key: it is not valid base64"),
    );
    let unknown = dir.file(
        "unknown.conf",
        &format!("[Interface]\nPrivateKey = {GW_PRIVATE}\n\n[Peer]\nPublicKey = {PEER_PUBLIC}\nAllowedIP = 10.0.0.2/32\n"),
    );
    assert_one_line_error(
        &["-c", &unknown],
        &format!("{unknown}:6: unknown key `AllowedIP` in [Peer]"),
    );
    let bad_setting = dir.file("mtu.conf", "[wgslirpy]\nMTU = 1500 bytes\n");
    assert_one_line_error(
        &["-c", &bad_setting, "-k", GW_PRIVATE, "-K", PEER_PUBLIC],
        &format!("{bad_setting}:2: MTU: `1500 bytes` is not a number of bytes"),
    );
    let missing = dir.path("missing.conf");
    assert_one_line_error(
        &["-c", &missing],
        &format!("cannot read {missing}: No such file or directory (os error 2)"),
    );
    // A valid file whose value the router refuses still says which setting it is.
    let small_mtu = dir.file(
        "small.conf",
        &format!("[Interface]\nPrivateKey = {GW_PRIVATE}\nListenPort = 0\n[Peer]\nPublicKey = {PEER_PUBLIC}\n[wgslirpy]\nMTU = 576\n"),
    );
    assert_one_line_error(
        &["-c", &small_mtu],
        "--mtu: 576 is below the minimum of 1280",
    );
}

#[test]
fn init_prints_config_and_qr_and_never_overwrites() {
    let dir = TempDir::new();
    let conf = dir.path("wgslirpy.conf");
    let out = wgslirpy(&["init", "--endpoint", "192.0.2.1:51820", "--config", &conf]);
    assert!(out.success(), "{out}");
    assert_eq!(
        fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The config comes first; the QR code under it encodes exactly that config.
    let (config, qr) = out
        .stdout
        .split_once("\n\n\u{2588}")
        .unwrap_or_else(|| panic!("no QR code after the config: {out}"));
    let config = config
        .split_once('\n')
        .map(|(comment, rest)| {
            assert!(comment.starts_with("# wg-quick config"), "{comment}");
            format!("{rest}\n")
        })
        .unwrap();
    assert!(
        config.contains("\nEndpoint = 192.0.2.1:51820\n"),
        "{config}"
    );
    let expected = QrCode::new(config.as_bytes())
        .unwrap()
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .build();
    assert_eq!(format!("\u{2588}{qr}"), format!("{expected}\n"));
    assert!(out.stderr.contains(&format!("wgslirpy -c {conf}")), "{out}");

    let before = fs::read_to_string(&conf).unwrap();
    assert_one_line_error(
        &["init", "--endpoint", "192.0.2.1:51820", "--config", &conf],
        &format!("{conf} already exists; use --force to overwrite it"),
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), before);
    let forced = wgslirpy(&[
        "init",
        "--endpoint",
        "192.0.2.1:51820",
        "--config",
        &conf,
        "--force",
    ]);
    assert!(forced.success(), "{forced}");
    assert_ne!(fs::read_to_string(&conf).unwrap(), before);

    let added = wgslirpy(&["add-peer", "--config", &conf, "--name", "laptop"]);
    assert!(added.success(), "{added}");
    assert!(
        added
            .stdout
            .contains("\nAddress = 10.0.2.3/32, fd00::3/128\n"),
        "{added}"
    );
    assert!(
        fs::read_to_string(&conf)
            .unwrap()
            .contains("# Name = laptop\n[Peer]\n")
    );
}

/// A file made by `init`, with `-b` overriding its `Bind`: the gateway binds exactly there,
/// and exits 0 on SIGTERM.
#[test]
fn gateway_starts_from_init_file_with_bind_override() {
    let dir = TempDir::new();
    let conf = dir.path("wgslirpy.conf");
    let out = wgslirpy(&["init", "--endpoint", "127.0.0.1:51820", "--config", &conf]);
    assert!(out.success(), "{out}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgslirpy"));
    cmd.args(["-c", &conf, "-b", "127.0.0.1:0"])
        .env("RUST_LOG", "debug");
    let mut gw = Proc::spawn("gateway", cmd, Path::new(&dir.path("gateway.log")));
    let pid = gw.pid();
    let bound = wait_until(Duration::from_secs(5), || {
        if !gw.is_alive() {
            return Some(Vec::new());
        }
        let sockets = bound_sockets(pid, Proto::Udp);
        (!sockets.is_empty() && signals_caught(pid, &[libc::SIGTERM])).then_some(sockets)
    })
    .unwrap_or_default();
    assert!(
        !bound.is_empty()
            && bound
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() != 51820),
        "wanted 127.0.0.1:<any> from -b, not the file's [::]:51820: {bound:?}\n{}",
        gw.log()
    );
    assert!(gw.signal(libc::SIGTERM));
    let status = gw.wait_exit(Duration::from_secs(2));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", gw.log());
}
