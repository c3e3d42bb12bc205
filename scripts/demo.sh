#!/usr/bin/env bash
# Builds cutover in release mode and runs `cutover demo` (extra arguments are passed on).
set -euo pipefail
CUTOVER_TAG=demo
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CUTOVER_ROOT"

if [ "${CUTOVER_SKIP_DEPS:-0}" != 1 ]; then
  bash scripts/install-deps.sh
fi
ensure_cargo_on_path

say "building cutover (release)"
cargo build --quiet --release -p cutover --bin cutover
binary="${CARGO_TARGET_DIR:-$CUTOVER_ROOT/target}/release/cutover"
say "running $binary demo $*"
exec "$binary" demo "$@"
