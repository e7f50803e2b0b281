//! End-to-end tests of ICMP echo forwarding: the peer pings a host in the "internet"
//! namespace through the gateway, over IPv4 and IPv6, with unprivileged ping sockets
//! and with raw sockets. Need root (skip loudly without it, fail under `CI=true`).

mod rig;

use std::net::IpAddr;
use std::time::Duration;

use rig::*;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn ping_internet(rig: &Rig) {
    for addr in [IpAddr::from(INET_V4), IpAddr::from(INET_V6)] {
        let result = rig.assert_ping(addr, 3);
        assert_eq!(result.received, 3, "{addr}: {:?}", result.output);
    }
}

/// As root, the gateway's network namespace does not allow ping sockets (the default
/// `ping_group_range` is empty), so the gateway falls back to raw sockets.
#[test]
fn ping_through_the_gateway_with_raw_sockets() {
    let Some(rig) = Rig::builder("ping_raw").start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_internet(&rig);
}

/// As `nobody`, with ping sockets allowed for every group, the gateway uses them.
#[test]
fn ping_through_the_gateway_unprivileged_with_ping_sockets() {
    let Some(mut rig) = Rig::builder("ping_unprivileged")
        .unprivileged()
        .defer_gateway()
        .start()
    else {
        return;
    };
    rig.gw.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    rig.start_gateway();
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    ping_internet(&rig);
}

/// As `nobody` without ping sockets, pings fail, the gateway says once how to enable them,
/// and everything else goes on working.
#[test]
fn ping_without_any_icmp_socket_explains_the_fix() {
    let Some(rig) = Rig::builder("ping_forbidden").unprivileged().start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    let result = rig.ping(&rig.peer, INET_V4.into(), 2);
    assert_eq!(result.received, 0, "{:?}", result.output);
    let log = rig.gateway_log();
    assert_eq!(log.matches("ping_group_range").count(), 1, "{log}");
    rig.assert_ping(PINGABLE_V4.into(), 2);
}

/// Three `ping` processes on the peer at once, each with its own identifier: each gets
/// all of its own replies.
#[test]
fn three_concurrent_pings_each_get_their_own_replies() {
    let Some(rig) = Rig::builder("ping_three").start() else {
        return;
    };
    rig.wait_handshake(HANDSHAKE_TIMEOUT);
    for addr in [INET_V4.to_string(), INET_V6.to_string()] {
        let script = format!(
            "for i in 1 2 3; do ping -n -c 5 -i 0.2 -W 2 {addr} > /tmp/ping-$$-$i & done; wait; \
             cat /tmp/ping-$$-*; rm -f /tmp/ping-$$-*"
        );
        let out = rig
            .peer
            .run_timeout(&["sh", "-c", &script], Duration::from_secs(20));
        let complete = out
            .stdout
            .matches("5 packets transmitted, 5 received")
            .count();
        assert_eq!(complete, 3, "{addr}: {out:?}");
        assert!(
            !out.stdout.contains("DUP") && !out.stdout.contains("wrong"),
            "{out:?}"
        );
    }
}
