#!/usr/bin/env bash
# Benchmarks cutover against pg_dump|psql, pgcopydb and native logical replication, in one run
# on two throwaway local clusters; prints the results and rewrites the generated section of
# docs/benchmarks.md. Arguments go to cutover-bench (e.g. --scale 20 --reps 3 --only copy).
set -euo pipefail
CUTOVER_TAG=bench
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CUTOVER_ROOT"
ensure_cargo_on_path

if ! command -v pgcopydb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing pgcopydb (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgcopydb; } >/dev/null; then
      say "could not install pgcopydb: its runs will be marked skipped"
    fi
  else
    say "pgcopydb is not installed (apt-get install pgcopydb): its runs will be marked skipped"
  fi
fi

say "building release binaries"
cargo build --quiet --release -p cutover --bin cutover --bin cutover-bench

say "running cutover-bench $*"
exec "$CUTOVER_ROOT/target/release/cutover-bench" "$@"
