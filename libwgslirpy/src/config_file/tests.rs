//! Parser tests: every key, the line syntax `wg` accepts, and errors that
//! name the file and line.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::Transport;

const KEY_A: &str = "SG43Zi0wGp4emfJ/XpTnnmtnK8SSjjIHOc3Zh37c928=";
const KEY_B: &str = "rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=";
const KEY_C: &str = "MR2RF5Tp+6BKt9k+deKg1GqR3re3ckJKti+uwZA84DU=";

fn parse(text: &str) -> Result<ConfigFile, ConfigFileError> {
    ConfigFile::parse(text, Path::new("wg0.conf"))
}

fn parse_ok(text: &str) -> ConfigFile {
    parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> String {
    parse(text).expect_err("should be refused").to_string()
}

fn net(text: &str) -> IpNetwork {
    text.parse().unwrap()
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A file as `wg-quick` users write them, with its interface-only keys.
#[test]
fn real_wg_quick_file() {
    let text = format!(
        "# /etc/wireguard/wg0.conf\n\
         [Interface]\n\
         Address = 10.200.100.1/24, fd42::1/64\n\
         ListenPort = 51820\n\
         PrivateKey = {KEY_A}\n\
         DNS = 1.1.1.1\n\
         MTU = 1380\n\
         Table = off\n\
         PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE\n\
         PostDown = iptables -D FORWARD -i %i -j ACCEPT\n\
         PreUp = true\n\
         PreDown = true\n\
         SaveConfig = false\n\
         \n\
         [Peer]\n\
         # laptop\n\
         PublicKey = {KEY_B}\n\
         AllowedIPs = 10.200.100.2/32, fd42::2/128\n\
         \n\
         [Peer]\n\
         PublicKey = {KEY_C}\n\
         PresharedKey = {KEY_A}\n\
         Endpoint = 192.0.2.7:51820\n\
         AllowedIPs = 10.200.100.3/32\n\
         PersistentKeepalive = 25\n"
    );
    let file = parse_ok(&text);
    assert_eq!(file.private_key.unwrap().to_base64(), KEY_A);
    assert_eq!(file.listen_port, Some(51820));
    assert_eq!(file.bind(), Some(addr("[::]:51820")));
    assert_eq!(file.peers.len(), 2);
    let (laptop, phone) = (&file.peers[0], &file.peers[1]);
    assert_eq!(laptop.public_key.to_base64(), KEY_B);
    assert_eq!(
        laptop.allowed_ips,
        [net("10.200.100.2/32"), net("fd42::2/128")]
    );
    assert_eq!(laptop.endpoint, None);
    assert_eq!(laptop.keepalive, None);
    assert!(laptop.preshared_key.is_none());
    assert_eq!(phone.public_key.to_base64(), KEY_C);
    assert_eq!(phone.preshared_key.unwrap().to_base64(), KEY_A);
    assert_eq!(phone.endpoint, Some(addr("192.0.2.7:51820")));
    assert_eq!(phone.keepalive, Some(25));
    // wg-quick's MTU and DNS are about its interface, not our settings.
    assert_eq!(file.settings, RouterSettings::default());
}

#[test]
fn every_wgslirpy_setting() {
    let text = format!(
        "[Interface]\nPrivateKey = {KEY_A}\n\
         [wgslirpy]\n\
         Bind = 127.0.0.1:5000\n\
         DNS = 10.0.2.1:5353\n\
         Pingable = 10.0.2.1, fd00::1\n\
         Pingable = 10.0.2.9\n\
         MTU = 1300\n\
         TcpBufferSize = 4096\n\
         TransmitQueueCapacity = 16\n\
         MaxUdpFlows = 10\n\
         UdpIdleTimeout = 30\n\
         IncomingUdp = 0.0.0.0:53,,10.0.2.15:53\n\
         IncomingUdp = [::]:54,,[fd00::2]:54\n\
         IncomingTcp = 0.0.0.0:8080,10.0.2.1:1234,10.0.2.15:80\n\
         UapiSocket = /run/wireguard/my gateway.sock\n\
         PublicEndpoint = vpn.example.com:51820\n\
         Allow = 127.0.0.0/8\n\
         Allow = [fd00::/8]:80-90\n\
         Deny = 10.0.0.0/8:22\n\
         HostAddress = 10.0.2.2\n\
         DnsTimeout = 3\n\
         MaxDnsQueries = 11\n\
         ResolverThreads = 2\n\
         MaxTcpConnections = 12\n\
         MaxTcpPendingConnects = 13\n\
         TcpConnectTimeout = 14\n\
         TcpIdleTimeout = 15\n\
         MaxReassemblyBytes = 65536\n\
         MaxIcmpIds = 16\n\
         TunnelSocketBuffer = 1048576\n\
         Metrics = 127.0.0.1:9100\n"
    );
    let file = parse_ok(&text);
    let mut config = Config::new(
        crate::config::Transport::RawIp {
            peer_endpoint: None,
        },
        addr("127.0.0.1:1"),
    );
    file.settings.apply(&mut config);
    assert_eq!(config.allow.len(), 2);
    assert_eq!(config.allow[1].to_string(), "[fd00::/8]:80-90");
    assert_eq!(config.deny[0].to_string(), "10.0.0.0/8:22");
    assert_eq!(config.host_address, Some("10.0.2.2".parse().unwrap()));
    assert_eq!(config.dns_timeout, Duration::from_secs(3));
    assert_eq!(config.max_dns_queries, 11);
    assert_eq!(config.resolver_threads, 2);
    assert_eq!(config.max_tcp_connections, 12);
    assert_eq!(config.max_tcp_pending_connects, 13);
    assert_eq!(config.tcp_connect_timeout, Duration::from_secs(14));
    assert_eq!(config.tcp_idle_timeout, Duration::from_secs(15));
    assert_eq!(config.max_reassembly_bytes, 65536);
    assert_eq!(config.max_icmp_ids, 16);
    assert_eq!(config.tunnel_socket_buffer, 1 << 20);
    assert_eq!(config.metrics, Some(addr("127.0.0.1:9100")));
    let s = file.settings;
    assert_eq!(s.bind, Some(addr("127.0.0.1:5000")));
    assert_eq!(s.dns, Some(addr("10.0.2.1:5353")));
    let pingable: Vec<IpAddr> = ["10.0.2.1", "fd00::1", "10.0.2.9"]
        .map(|ip| ip.parse().unwrap())
        .into();
    assert_eq!(s.pingable, pingable);
    assert_eq!(s.mtu, Some(1300));
    assert_eq!(s.tcp_buffer_size, Some(4096));
    assert_eq!(s.transmit_queue_capacity, Some(16));
    assert_eq!(s.max_udp_flows, Some(10));
    assert_eq!(s.udp_idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(s.incoming_udp.len(), 2);
    assert_eq!(s.incoming_udp[1].dest, addr("[fd00::2]:54"));
    assert_eq!(s.incoming_tcp.len(), 1);
    assert_eq!(s.incoming_tcp[0].source, Some(addr("10.0.2.1:1234")));
    // Spaces inside a [wgslirpy] value are kept.
    assert_eq!(
        s.uapi_socket.as_deref(),
        Some(Path::new("/run/wireguard/my gateway.sock"))
    );
    assert_eq!(s.public_endpoint.as_deref(), Some("vpn.example.com:51820"));
}

#[test]
fn every_settings_key_is_reachable_and_unique() {
    let mut names: Vec<String> = SETTINGS.iter().map(|(n, _)| n.to_lowercase()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), SETTINGS.len(), "duplicate [wgslirpy] key");
}

#[test]
fn dns_without_port_means_53() {
    let s = parse_ok("[wgslirpy]\nDNS = fd00::1\n").settings;
    assert_eq!(s.dns, Some(addr("[fd00::1]:53")));
}

#[test]
fn apply_sets_only_what_the_file_gives() {
    let file = parse_ok("[wgslirpy]\nMTU = 1300\nPingable = 10.0.2.1\nUapiSocket = /tmp/x.sock\n");
    let mut config = Config::new(
        Transport::RawIp {
            peer_endpoint: None,
        },
        addr("127.0.0.1:1"),
    );
    let defaults = config.clone();
    file.settings.apply(&mut config);
    assert_eq!(config.mtu, 1300);
    assert_eq!(config.pingable, ["10.0.2.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        config.uapi_socket.as_deref(),
        Some(Path::new("/tmp/x.sock"))
    );
    assert_eq!(config.tcp_buffer_size, defaults.tcp_buffer_size);
    assert_eq!(config.max_udp_flows, defaults.max_udp_flows);
    assert_eq!(config.udp_idle_timeout, defaults.udp_idle_timeout);
    assert_eq!(config.dns, None);
    assert_eq!(config.metrics, None);
}

#[test]
fn comments_blank_lines_case_and_whitespace_as_wg() {
    let text = format!(
        "\n   # a comment\n\
         [INTERFACE]   # trailing comment\n\
         \tprivatekey\t=\t{KEY_A}   \r\n\
         LISTENPORT=51820#comment\n\
         \n\
         [ peer ]\n\
         publickey = {KEY_B}\n\
         allowedips = 10.0.0.2 / 32 ,  fd00::2/128   \n\
         persistentkeepalive = OFF\n\
         [WgSlirpy]\n\
         mtu = 1400\n"
    );
    let file = parse_ok(&text);
    assert_eq!(file.private_key.unwrap().to_base64(), KEY_A);
    assert_eq!(file.listen_port, Some(51820));
    assert_eq!(file.peers[0].public_key.to_base64(), KEY_B);
    assert_eq!(
        file.peers[0].allowed_ips,
        [net("10.0.0.2/32"), net("fd00::2/128")]
    );
    assert_eq!(file.peers[0].keepalive, None);
    assert_eq!(file.settings.mtu, Some(1400));
}

#[test]
fn repeated_keys_accumulate_or_replace_as_in_wg() {
    let text = format!(
        "[Peer]\nPublicKey = {KEY_B}\n\
         AllowedIPs = 10.0.0.2/32\n\
         AllowedIPs = 10.0.1.0/24, fd00::/64\n\
         Endpoint = 192.0.2.1:1\n\
         Endpoint = 192.0.2.2:2\n\
         PersistentKeepalive = 10\n\
         PersistentKeepalive = 0\n\
         [Interface]\nPrivateKey = {KEY_B}\nPrivateKey = {KEY_A}\n"
    );
    let file = parse_ok(&text);
    let peer = &file.peers[0];
    assert_eq!(
        peer.allowed_ips,
        [net("10.0.0.2/32"), net("10.0.1.0/24"), net("fd00::/64")]
    );
    assert_eq!(peer.endpoint, Some(addr("192.0.2.2:2")));
    assert_eq!(peer.keepalive, None, "0 means off");
    assert_eq!(file.private_key.unwrap().to_base64(), KEY_A);
}

#[test]
fn bare_allowed_ip_is_a_host_route_and_ipv6_endpoint() {
    let text = format!(
        "[Peer]\nPublicKey={KEY_B}\nAllowedIPs=10.0.0.2,fd00::2\nEndpoint=[fd00::9]:51820\n"
    );
    let peer = &parse_ok(&text).peers[0];
    assert_eq!(peer.allowed_ips, [net("10.0.0.2/32"), net("fd00::2/128")]);
    assert_eq!(peer.endpoint, Some(addr("[fd00::9]:51820")));
}

#[test]
fn bind_wins_over_listen_port_when_they_agree() {
    let file = parse_ok("[Interface]\nListenPort = 5000\n[wgslirpy]\nBind = 127.0.0.1:5000\n");
    assert_eq!(file.bind(), Some(addr("127.0.0.1:5000")));
    assert_eq!(parse_ok("[Interface]\n").bind(), None);
}

/// Each bad file with the exact one-line message it must give.
#[test]
fn errors_name_file_line_and_key() {
    let cases: &[(&str, &str)] = &[
        (
            "[Interface]\nPrivateKey = not-a-key!\n",
            "wg0.conf:2: PrivateKey: invalid key: it is not valid base64",
        ),
        (
            "# c\n\n[Peer]\n  publickey = AAAA\n",
            "wg0.conf:4: PublicKey: invalid key: it decodes to 3 bytes, not 32",
        ),
        (
            "[Interface]\nColour = blue\n",
            "wg0.conf:2: unknown key `Colour` in [Interface]",
        ),
        (
            "[Peer]\nAddress = 10.0.0.1/32\n",
            "wg0.conf:2: unknown key `Address` in [Peer]",
        ),
        (
            "[wgslirpy]\nMtuu = 1400\n",
            "wg0.conf:2: unknown key `Mtuu` in [wgslirpy]",
        ),
        (
            "PrivateKey = x\n",
            "wg0.conf:1: `PrivateKey` is outside any section; start with [Interface] or [Peer]",
        ),
        (
            "[Interfaces]\n",
            "wg0.conf:1: unknown section `[Interfaces]` (expected [Interface], [Peer] or [wgslirpy])",
        ),
        (
            "[Interface]\nListenPort\n",
            "wg0.conf:2: expected `Key = Value` or a [Section], found `ListenPort`",
        ),
        (
            "[Interface]\nListenPort =\n",
            "wg0.conf:2: ListenPort: empty value",
        ),
        (
            "[Interface]\nListenPort = 70000\n",
            "wg0.conf:2: ListenPort: `70000` is not a port number",
        ),
        (
            "[Peer]\nAllowedIPs = 10.0.0.1/32\n",
            "wg0.conf:1: [Peer] section has no PublicKey",
        ),
        (
            "[Peer]\nPublicKey = rPpCjWzIv/yAtZZi+C/pVprie8D0QaGlPtJXlDi6bmI=\nAllowedIPs = 10.0.0.1/33\n",
            "wg0.conf:3: AllowedIPs: `10.0.0.1/33`: prefix too long",
        ),
        (
            "[Peer]\nAllowedIPs = 10.0.0.1/32,\n",
            "wg0.conf:2: AllowedIPs: empty item in the list `10.0.0.1/32,`",
        ),
        (
            "[Peer]\nAllowedIPs = 10.0.0.x\n",
            "wg0.conf:2: AllowedIPs: `10.0.0.x` is not an IP address or IP/PREFIX",
        ),
        (
            "[Peer]\nEndpoint = 192.0.2.1\n",
            "wg0.conf:2: Endpoint: `192.0.2.1`: no port (expected HOST:PORT)",
        ),
        (
            "[Peer]\nEndpoint = [fd00::1:51820\n",
            "wg0.conf:2: Endpoint: `[fd00::1:51820`: no `]` after the IPv6 address",
        ),
        (
            "[Peer]\nPersistentKeepalive = often\n",
            "wg0.conf:2: PersistentKeepalive: `often` is not a number of seconds (0-65535) or `off`",
        ),
        (
            "[wgslirpy]\nMTU = big\n",
            "wg0.conf:2: MTU: `big` is not a number of bytes",
        ),
        (
            "[wgslirpy]\nUdpIdleTimeout = 0\n",
            "wg0.conf:2: UdpIdleTimeout: it must be at least 1 second",
        ),
        ("[wgslirpy]\nBind =   \n", "wg0.conf:2: Bind: empty value"),
        (
            "[Interface]\nListenPort = 1\n[wgslirpy]\n\nBind = 127.0.0.1:2\n",
            "wg0.conf:5: Bind: port 2 differs from [Interface] ListenPort = 1",
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(text, expected)| error(text) != *expected)
        .map(|(text, expected)| format!("{text:?}\n  gave   {}\n  wanted {expected}", error(text)))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn forward_error_keeps_its_explanation() {
    let e = error("[wgslirpy]\nIncomingTcp = 1.2.3.4\n");
    assert!(
        e.starts_with(
            "wg0.conf:2: IncomingTcp: invalid forward `1.2.3.4`: expected HOST,SOURCE,DEST"
        ),
        "{e}"
    );
}

#[test]
fn duplicate_peer_names_the_first() {
    let text = format!("[Peer]\nPublicKey = {KEY_B}\n\n[Peer]\nPublicKey = {KEY_B}\n");
    assert_eq!(
        error(&text),
        "wg0.conf:5: PublicKey: this peer is already defined by the [Peer] at line 1"
    );
}

#[test]
fn load_reports_unreadable_file() {
    let e = ConfigFile::load(Path::new("/nonexistent/wg0.conf")).unwrap_err();
    assert_eq!(e.to_string(), "cannot read /nonexistent/wg0.conf");
    assert!(matches!(e, ConfigFileError::Read { .. }));
}

#[test]
fn split_host_port_forms() {
    assert_eq!(
        split_host_port("vpn.example:51820"),
        Ok(("vpn.example", 51820))
    );
    assert_eq!(split_host_port("[fd00::1]:7"), Ok(("fd00::1", 7)));
    assert!(split_host_port(":7").is_err());
    assert!(split_host_port("host:").is_err());
}
