#!/usr/bin/env bash
# Installs what the end-to-end tests and the demo use, from Debian's packages; with
# --bench, also what the benchmark suite alone uses (perf). Needs root; does nothing for
# packages that are already there.
set -euo pipefail

packages=(
  wireguard-go wireguard-tools   # the real peer, and `wg` to configure it
  iproute2 iputils-ping          # namespaces, veth, ping
  socat curl dnsutils iperf3     # clients and servers
  nftables python3 util-linux    # NAT baseline, test servers, setpriv
  dnsmasq-base                   # the DNS tests' nameserver: the binary, no system service
)
if [ "${1:-}" = --bench ]; then
  packages+=(linux-perf)         # the benchmark's gateway share and --perf profiles
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run this script as root to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
