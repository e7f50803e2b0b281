#!/usr/bin/env bash
# Runs the whole test suite: the patched gotatun's unit tests, then unit tests,
# sans-I/O router tests, and the end-to-end tests against a real wireguard-go
# peer in network namespaces.
# As root it first installs the packages the end-to-end tests need. Without
# root the end-to-end tests say loudly that they skip (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  scripts/install-deps.sh
fi
cargo build --workspace --all-targets
# The patched gotatun's own unit tests (vendor/gotatun/PATCHED.md), with the
# features wgslirpy uses and `tun`, which some of them need; it is a crate of
# its own, outside the workspace.
target="${CARGO_TARGET_DIR:-$PWD/target}"
(cd vendor/gotatun && CARGO_TARGET_DIR="$target/gotatun" \
  cargo test --lib --no-default-features --features device,ring,tun)
exec cargo test --workspace "$@"
