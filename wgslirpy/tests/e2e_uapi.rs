//! End-to-end test of `--uapi-socket`: `wg show` reads the gateway's state through
//! WireGuard's configuration protocol. Needs root (skips loudly without it, fails under
//! `CI=true`), like every rig test.

mod rig;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rig::*;

#[test]
fn wg_show_reports_the_peer_through_the_uapi_socket() {
    let Some(mut rig) = Rig::builder("wg_show_uapi")
        .gateway_keepalive(Some(25))
        .defer_gateway()
        .start()
    else {
        return;
    };
    // `wg show NAME` looks for /var/run/wireguard/NAME.sock; the name is unique per rig.
    let name = format!("{}g", rig.wg_dev);
    let socket = format!("/var/run/wireguard/{name}.sock");
    let mut args = rig.gateway_args().to_vec();
    args.extend(["--uapi-socket".to_string(), socket.clone()]);
    rig.set_gateway_args(args);
    rig.start_gateway();

    rig.wait_handshake(Duration::from_secs(10));
    rig.assert_ping(PINGABLE_V4.into(), 2);

    let mut wg = Command::new("wg");
    wg.args(["show", &name]);
    let show = run_timeout(wg, Duration::from_secs(5));
    assert!(show.success(), "wg show failed: {show:?}");
    let text = &show.stdout;
    let gw_public = rig.gateway_keys().public.clone();
    let peer_public = rig.peer_keys().public.clone();
    assert!(text.contains(&format!("public key: {gw_public}")), "{text}");
    assert!(text.contains("listening port: "), "{text}");
    assert!(text.contains(&format!("peer: {peer_public}")), "{text}");
    assert!(text.contains("latest handshake: "), "{text}");
    assert!(text.contains("allowed ips: 0.0.0.0/0, ::/0"), "{text}");
    let transfer = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("transfer: "))
        .unwrap_or_else(|| panic!("no transfer line: {text}"));
    assert!(!transfer.starts_with("0 B received"), "{transfer}");
    let endpoint = std::net::SocketAddr::new(PEER_UNDERLAY_V4.into(), PEER_PORT).to_string();
    assert!(text.contains(&format!("endpoint: {endpoint}")), "{text}");
    assert!(
        text.contains("persistent keepalive: every 25 seconds"),
        "{text}"
    );

    // `wg showconf` gives the same as a config file.
    let mut wg = Command::new("wg");
    wg.args(["showconf", &name]);
    let conf = run_timeout(wg, Duration::from_secs(5));
    assert!(conf.success(), "wg showconf failed: {conf:?}");
    for line in [
        "[Interface]".to_string(),
        format!("ListenPort = {GW_PORT}"),
        "[Peer]".to_string(),
        format!("PublicKey = {peer_public}"),
        "AllowedIPs = 0.0.0.0/0, ::/0".to_string(),
        format!("Endpoint = {endpoint}"),
        "PersistentKeepalive = 25".to_string(),
    ] {
        assert!(
            conf.stdout.lines().any(|l| l == line),
            "no {line:?} in\n{}",
            conf.stdout
        );
    }

    // A clean shutdown removes the socket.
    let status = rig.stop_gateway(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!Path::new(&socket).exists(), "{socket} left behind");
}
