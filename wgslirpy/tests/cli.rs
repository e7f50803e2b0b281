//! Tests of the `wgslirpy` command line that need no root and no namespaces: startup errors,
//! key tools and signal handling. Everything binds to 127.0.0.1 only.

mod rig;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rig::{Proc, Proto, bound_sockets, run_timeout, signals_caught, wait_until};

/// Key pairs from the original 0.2.0 demo session.
const PEER_PRIVATE: &str = "4Khaa5tgPI9NJsO2R896Yd6748k9fW4aapGZnIcUM14=";
const PEER_PUBLIC: &str = "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=";
const GW_PRIVATE: &str = "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=";
const GW_PUBLIC: &str = "MR2RF5Tp+6BKt9k+deKg1GqR3re3ckJKti+uwZA84DU=";

fn wgslirpy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgslirpy"));
    c.env_remove("RUST_LOG");
    c
}

/// Runs wgslirpy with `args` and checks it fails fast and cleanly: non-zero exit (not a
/// signal) within 1 s, exactly one non-empty line on stderr mentioning one of `mentions`
/// (case-insensitive), and no panic.
#[track_caller]
fn assert_startup_error(args: &[&str], mentions: &[&str]) {
    let mut c = wgslirpy();
    c.args(args);
    let out = run_timeout(c, Duration::from_secs(5));
    assert!(!out.timed_out(), "did not exit: {out}");
    let code = out.status.and_then(|s| s.code());
    assert!(
        code.is_some_and(|c| c != 0),
        "wanted a non-zero exit code: {out}"
    );
    assert!(
        out.elapsed < Duration::from_secs(1),
        "took {:?} to fail: {out}",
        out.elapsed
    );
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains("panicked"), "it panicked: {out}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "wanted exactly one stderr line: {out}");
    let line = lines[0].to_lowercase();
    assert!(
        mentions.iter().any(|m| line.contains(&m.to_lowercase())),
        "stderr line should name the problem (one of {mentions:?}): {out}"
    );
}

#[test]
fn startup_error_bad_private_key() {
    assert_startup_error(
        &["-k", "notakey", "-K", PEER_PUBLIC, "-b", "127.0.0.1:0"],
        &["key"],
    );
}

#[test]
fn startup_error_bad_peer_key() {
    assert_startup_error(
        &["-k", GW_PRIVATE, "-K", "notakey", "-b", "127.0.0.1:0"],
        &["key"],
    );
}

#[test]
fn startup_error_missing_key_file() {
    assert_startup_error(
        &["-f", "/nonexistent", "-K", PEER_PUBLIC, "-b", "127.0.0.1:0"],
        &["/nonexistent"],
    );
}

#[test]
fn startup_error_bad_triplet() {
    let args = [
        "-k",
        GW_PRIVATE,
        "-K",
        PEER_PUBLIC,
        "-b",
        "127.0.0.1:0",
        "-t",
        "1.2.3.4",
    ];
    assert_startup_error(&args, &["1.2.3.4"]);
}

#[test]
fn startup_error_bad_bind_address() {
    assert_startup_error(
        &["-k", GW_PRIVATE, "-K", PEER_PUBLIC, "-b", "nonsense"],
        &["nonsense"],
    );
}

#[test]
fn startup_error_bind_port_in_use() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind a test socket");
    let addr = taken.local_addr().unwrap().to_string();
    assert_startup_error(
        &["-k", GW_PRIVATE, "-K", PEER_PUBLIC, "-b", &addr],
        &[&addr, "in use"],
    );
    drop(taken);
}

#[test]
fn startup_error_bad_metrics_address() {
    assert_startup_error(
        &[
            "-k",
            GW_PRIVATE,
            "-K",
            PEER_PUBLIC,
            "-b",
            "127.0.0.1:0",
            "--metrics",
            "localhost",
        ],
        &["--metrics"],
    );
}

#[test]
fn startup_error_metrics_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on a test socket");
    let addr = taken.local_addr().unwrap().to_string();
    assert_startup_error(
        &[
            "-k",
            GW_PRIVATE,
            "-K",
            PEER_PUBLIC,
            "-b",
            "127.0.0.1:0",
            "--metrics",
            &addr,
        ],
        &["--metrics"],
    );
    drop(taken);
}

#[test]
fn startup_error_forward_port_in_use() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind a test socket");
    let addr = taken.local_addr().unwrap().to_string();
    let forward = format!("{addr},,10.0.2.15:53");
    assert_startup_error(
        &[
            "-k",
            GW_PRIVATE,
            "-K",
            PEER_PUBLIC,
            "-b",
            "127.0.0.1:0",
            "-u",
            &forward,
        ],
        &[&addr, "-u", "in use"],
    );
    drop(taken);
}

#[test]
fn startup_error_tcp_forward_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on a test socket");
    let addr = taken.local_addr().unwrap().to_string();
    let forward = format!("{addr},,10.0.2.15:80");
    assert_startup_error(
        &[
            "-k",
            GW_PRIVATE,
            "-K",
            PEER_PUBLIC,
            "-b",
            "127.0.0.1:0",
            "-t",
            &forward,
        ],
        &[&addr, "-t", "in use"],
    );
    drop(taken);
}

/// Runs wgslirpy with `args` and `stdin`, returning (exit code, stdout, stderr).
fn run_with_stdin(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let mut child = wgslirpy()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wgslirpy");
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let finished = wait_until(Duration::from_secs(5), || child.try_wait().ok().flatten());
    if finished.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for wgslirpy");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn genkey_and_pubkey_like_wg() {
    for (private, public) in [(PEER_PRIVATE, PEER_PUBLIC), (GW_PRIVATE, GW_PUBLIC)] {
        let (code, out, err) = run_with_stdin(&["pubkey"], &format!("{private}\n"));
        assert_eq!(code, Some(0), "pubkey failed: {err}");
        assert_eq!(out, format!("{public}\n"), "pubkey of {private}");
    }
    let (code, key, err) = run_with_stdin(&["genkey"], "");
    assert_eq!(code, Some(0), "genkey failed: {err}");
    let key = key.strip_suffix('\n').expect("genkey ends its line");
    assert!(
        key.len() == 44 && key.ends_with('=') && !key.contains(char::is_whitespace),
        "genkey printed {key:?}"
    );
    let (code, public, err) = run_with_stdin(&["pubkey"], &format!("{key}\n"));
    assert_eq!(code, Some(0), "pubkey of a generated key failed: {err}");
    if let Ok(out) = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut wg| {
            wg.stdin
                .take()
                .unwrap()
                .write_all(format!("{key}\n").as_bytes())?;
            wg.wait_with_output()
        })
    {
        assert_eq!(
            public,
            String::from_utf8_lossy(&out.stdout),
            "differs from wg pubkey"
        );
    }
}

/// Starts a gateway on 127.0.0.1:0, waits until it has bound its socket and installed its
/// signal handlers, sends `sig`, and expects exit code 0 within 2 s.
fn exits_zero_on(sig: i32, sig_name: &str) {
    static N: AtomicU32 = AtomicU32::new(0);
    let log = std::env::temp_dir().join(format!(
        "wgs-cli-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = wgslirpy();
    cmd.args(["-k", GW_PRIVATE, "-K", PEER_PUBLIC, "-b", "127.0.0.1:0"])
        .env("RUST_LOG", "debug");
    let mut gw = Proc::spawn("gateway", cmd, &log);
    let pid = gw.pid();
    let ready = wait_until(Duration::from_secs(5), || {
        if !gw.is_alive() {
            return Some(false);
        }
        let bound = bound_sockets(pid, Proto::Udp)
            .iter()
            .any(|a| a.ip().is_loopback());
        (bound && signals_caught(pid, &[libc::SIGTERM, libc::SIGINT])).then_some(true)
    });
    let status = gw.try_status();
    let log_text = gw.log();
    assert_eq!(
        ready,
        Some(true),
        "gateway not ready (bound on 127.0.0.1 with SIGTERM and SIGINT handled) within 5 s; \
         exit {status:?}; sockets {:?}\n{log_text}",
        bound_sockets(pid, Proto::Udp)
    );
    let sent = Instant::now();
    assert!(gw.signal(sig), "could not send {sig_name}");
    let status = gw.wait_exit(Duration::from_secs(2));
    let elapsed = sent.elapsed();
    let log_text = gw.log();
    let _ = std::fs::remove_file(&log);
    let status = status.unwrap_or_else(|| panic!("still running 2 s after {sig_name}\n{log_text}"));
    assert_eq!(
        status.code(),
        Some(0),
        "{sig_name} gave {status} after {elapsed:?}\n{log_text}"
    );
    assert!(!log_text.contains("panicked"), "{log_text}");
}

#[test]
fn sigterm_exits_zero() {
    exits_zero_on(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_exits_zero() {
    exits_zero_on(libc::SIGINT, "SIGINT");
}
