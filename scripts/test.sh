#!/usr/bin/env bash
# Runs the whole test suite: unit tests, sans-I/O router tests, and the
# end-to-end tests against a real wireguard-go peer in network namespaces.
# As root it first installs the packages the end-to-end tests need. Without
# root the end-to-end tests say loudly that they skip (and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  scripts/install-deps.sh
fi
cargo build --workspace --all-targets
exec cargo test --workspace "$@"
