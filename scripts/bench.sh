#!/usr/bin/env bash
# Benchmarks cutover against pg_dump|psql, pgcopydb, native logical replication and (verify)
# reladiff, in one run on two throwaway local clusters; prints the results and rewrites the
# generated section of docs/benchmarks.md. Arguments go to cutover-bench (e.g. --scale 20
# --reps 3 --only copy, or --only verify --verify-scale 100).
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

if ! command -v reladiff >/dev/null 2>&1; then
  if command -v python3 >/dev/null 2>&1; then
    say "installing reladiff (pip), the verify scenario's peer"
    pip_flags=(--quiet --disable-pip-version-check)
    # Debian 12's own python3 is "externally managed" (PEP 668).
    if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null; then
      pip_flags+=(--break-system-packages)
    fi
    if python3 -m pip install "${pip_flags[@]}" 'reladiff[postgresql]' >/dev/null 2>&1; then
      if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
      hash -r
    else
      say "could not install reladiff: its runs will be marked skipped"
    fi
  else
    say "reladiff is not installed and there is no python3 (pip install 'reladiff[postgresql]'): its runs will be marked skipped"
  fi
fi

say "building release binaries"
cargo build --quiet --release -p cutover --bin cutover --bin cutover-bench

say "running cutover-bench $*"
exec "$CUTOVER_ROOT/target/release/cutover-bench" "$@"
