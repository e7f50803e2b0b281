#!/usr/bin/env bash
# The benchmark suite (issues 3 and 8): builds the release binary, then measures it and the
# kernel baseline (wireguard-go + ip_forward + nftables masquerade) in network namespaces,
# in the same run. Prints a table and writes it to bench/results/. Needs root; takes a few
# minutes on 2 cores. Not part of `cargo test`. Options: see `bench/bench.py --help`
# (--quick for a smoke run, --gateway-arg ARG to pass wgslirpy a flag, --binary PATH,
# --measure LIST for a subset, --perf for a profile).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench: needs root (network namespaces): run bench/run.sh as root" >&2
  exit 1
fi
scripts/install-deps.sh --bench
target="${CARGO_TARGET_DIR:-$PWD/target}"
binary="$target/release/wgslirpy"
if [[ " $* " != *" --binary "* ]]; then
  cargo build --release -p wgslirpy
  set -- --binary "$binary" "$@"
fi
exec python3 bench/bench.py "$@"
