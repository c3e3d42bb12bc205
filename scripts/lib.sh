# Shared by the scripts in this folder: sourced, never run on its own.

CUTOVER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# One line of progress, tagged with the script's name.
say() { printf '[%s] %s\n' "${CUTOVER_TAG:-cutover}" "$*"; }
die() {
  say "ERROR: $*" >&2
  exit 1
}

# rustup installs cargo under ~/.cargo/bin, which a non-login shell may not have on PATH.
ensure_cargo_on_path() {
  local cargo_bin="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin"
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$cargo_bin/cargo" ]; then
    PATH="$cargo_bin:$PATH"
    export PATH
  fi
}

have_nextest() { cargo nextest --version >/dev/null 2>&1; }
