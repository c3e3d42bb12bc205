#!/usr/bin/env bash
# Everything CI checks (.ci/run runs this): dependencies, formatting, clippy, the test suite.
# Runs every check even after one fails, then exits non-zero when any failed.
set -euo pipefail
CUTOVER_TAG=test
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CUTOVER_ROOT"

if [ "${CUTOVER_SKIP_DEPS:-0}" != 1 ]; then
  bash scripts/install-deps.sh
fi
ensure_cargo_on_path

failed=()
step() {
  local name="$1"
  shift
  say "$name: $*"
  local start=$SECONDS
  if "$@"; then
    say "$name: ok ($((SECONDS - start))s)"
  else
    say "$name: FAILED ($((SECONDS - start))s)"
    failed+=("$name")
  fi
}

step fmt cargo fmt --all --check
step clippy cargo clippy --quiet --workspace --all-targets -- -D warnings
if have_nextest; then
  step tests cargo nextest run --workspace --profile ci
else
  say "cargo-nextest is not installed: using cargo test"
  step tests cargo test --workspace
fi

if [ "${#failed[@]}" -gt 0 ]; then
  say "checks that failed: ${failed[*]}"
  exit 1
fi
say "fmt, clippy and tests all ok"
