#!/usr/bin/env bash
# A self-contained demo of wgslirpy, run as root on Debian:
#
#   scripts/demo.sh        (as root)
#
# It builds three network namespaces on this machine and tears them down at
# the end (also on Ctrl-C or error):
#
#   wgsdemo-peer  a real WireGuard peer: wireguard-go, configured with `wg`,
#                 whose default routes (v4 and v6) go into the tunnel
#   wgsdemo-gw    wgslirpy, running as the unprivileged user `nobody`
#   wgsdemo-net   "the internet": a web server and a UDP echo server on
#                 198.18.1.2 and fd00:1::2, known to the gateway as www.test
#
# The peer then handshakes, pings the gateway and the internet, looks up
# www.test through the gateway's DNS server, downloads a page over TCP, and
# exchanges UDP with the echo server. No traffic leaves this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces and wireguard-go's TUN device)" >&2
  exit 1
fi

PEER=wgsdemo-peer GW=wgsdemo-gw NET=wgsdemo-net WG_DEV=wgsdemo0
WORK=""
PIDS=()

cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 0.2
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  for ns in "$PEER" "$GW" "$NET"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "/etc/netns/$GW" "/var/run/wireguard/$WG_DEV.sock"
  [ -z "$WORK" ] || rm -rf "$WORK"
}
trap cleanup EXIT
cleanup 2>/dev/null || true   # leftovers of an interrupted earlier run
WORK=$(mktemp -d /tmp/wgslirpy-demo.XXXXXX)
chmod 755 "$WORK"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

step "Installing packages and building wgslirpy"
scripts/install-deps.sh
cargo build --release --quiet
install -m 755 target/release/wgslirpy "$WORK/wgslirpy"

step "Creating namespaces: $PEER <-> $GW <-> $NET"
for ns in "$PEER" "$GW" "$NET"; do
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
done
ip link add wgsd-p type veth peer name wgsd-g1
ip link set wgsd-p netns "$PEER"
ip link set wgsd-g1 netns "$GW"
ip link add wgsd-g2 type veth peer name wgsd-n
ip link set wgsd-g2 netns "$GW"
ip link set wgsd-n netns "$NET"
in_ns "$PEER" ip addr add 198.18.0.1/30 dev wgsd-p
in_ns "$PEER" ip link set wgsd-p up
in_ns "$GW" ip addr add 198.18.0.2/30 dev wgsd-g1
in_ns "$GW" ip link set wgsd-g1 up
in_ns "$GW" ip addr add 198.18.1.1/24 dev wgsd-g2
in_ns "$GW" ip addr add fd00:1::1/64 dev wgsd-g2 nodad
in_ns "$GW" ip link set wgsd-g2 up
in_ns "$GW" ip route add default via 198.18.1.2
in_ns "$GW" ip -6 route add default via fd00:1::2
in_ns "$NET" ip addr add 198.18.1.2/24 dev wgsd-n
in_ns "$NET" ip addr add fd00:1::2/64 dev wgsd-n nodad
in_ns "$NET" ip link set wgsd-n up
# The gateway gets its own resolver files, so nothing here uses the host's.
mkdir -p "/etc/netns/$GW"
printf '198.18.1.2 www.test\nfd00:1::2 www.test\n' > "/etc/netns/$GW/hosts"
echo "nameserver 198.18.1.2" > "/etc/netns/$GW/resolv.conf"
# Let the unprivileged gateway open ping sockets, to forward the peer's pings.
in_ns "$GW" sysctl -qw net.ipv4.ping_group_range="0 2147483647"

step "Generating keys"
"$WORK/wgslirpy" genkey > "$WORK/gw.key"
"$WORK/wgslirpy" genkey > "$WORK/peer.key"
GW_PUB=$("$WORK/wgslirpy" pubkey < "$WORK/gw.key")
PEER_PUB=$("$WORK/wgslirpy" pubkey < "$WORK/peer.key")
chmod 644 "$WORK/gw.key"   # readable by `nobody`, who runs the gateway
echo "gateway public key: $GW_PUB"
echo "peer public key:    $PEER_PUB"

step "Starting a web server and a UDP echo server in $NET"
mkdir -p "$WORK/www"
echo "Hello from the internet namespace, through wgslirpy." > "$WORK/www/index.html"
ip netns exec "$NET" python3 -m http.server --bind :: --directory "$WORK/www" 80 \
  >"$WORK/http.log" 2>&1 &
PIDS+=($!)
ip netns exec "$NET" python3 -c '
import socket, select
socks = []
for family, addr in ((socket.AF_INET, "198.18.1.2"), (socket.AF_INET6, "fd00:1::2")):
    s = socket.socket(family, socket.SOCK_DGRAM); s.bind((addr, 7)); socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535); s.sendto(data, peer)
' &
PIDS+=($!)

step "Starting wgslirpy in $GW as user nobody"
ip netns exec "$GW" setpriv --reuid=nobody --regid=nogroup --clear-groups \
  "$WORK/wgslirpy" -f "$WORK/gw.key" -K "$PEER_PUB" \
  -b 198.18.0.2:51821 -P 10.0.2.1 -P fd00::1 -D 10.0.2.1:53 &
PIDS+=($!)

step "Starting the wireguard-go peer in $PEER"
ip netns exec "$PEER" env WG_PROCESS_FOREGROUND=1 wireguard-go "$WG_DEV" >"$WORK/wireguard-go.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "/var/run/wireguard/$WG_DEV.sock" ] && break; sleep 0.1; done
in_ns "$PEER" wg set "$WG_DEV" private-key "$WORK/peer.key" \
  peer "$GW_PUB" endpoint 198.18.0.2:51821 allowed-ips 0.0.0.0/0,::/0 persistent-keepalive 5
in_ns "$PEER" ip addr add 10.0.2.15/32 dev "$WG_DEV"
in_ns "$PEER" ip addr add fd00::15/128 dev "$WG_DEV" nodad
in_ns "$PEER" ip link set "$WG_DEV" up
in_ns "$PEER" ip route add default dev "$WG_DEV"
in_ns "$PEER" ip -6 route add default dev "$WG_DEV"

step "Pinging the gateway's pingable addresses through the tunnel"
in_ns "$PEER" ping -c 3 -W 2 10.0.2.1
in_ns "$PEER" ping -6 -c 3 -W 2 fd00::1

step "The peer's view of the tunnel"
in_ns "$PEER" wg show "$WG_DEV"

step "Pinging the internet namespace through the gateway"
in_ns "$PEER" ping -c 2 -W 2 198.18.1.2
in_ns "$PEER" ping -6 -c 2 -W 2 fd00:1::2

step "Looking up www.test through the gateway's DNS server (-D)"
in_ns "$PEER" dig +short @10.0.2.1 www.test A
in_ns "$PEER" dig +short @10.0.2.1 www.test AAAA

step "Downloading a page over TCP, IPv4 and IPv6"
in_ns "$PEER" curl -sS --max-time 10 http://198.18.1.2/
in_ns "$PEER" curl -sS -g --max-time 10 'http://[fd00:1::2]/'

step "UDP through the gateway to the echo server in $NET"
for server in 198.18.1.2 '[fd00:1::2]'; do
  reply=$(echo "hello via wgslirpy" | in_ns "$PEER" socat -T 2 - "UDP:$server:7")
  echo "$server answered: $reply"
  [ "$reply" = "hello via wgslirpy" ]
done

step "Demo finished: a real WireGuard peer reached a server through wgslirpy"
