#!/usr/bin/env bash
# How fast the source's walsender ships one pgbench backlog to pg_recvlogical, by transport
# (unix socket, TCP on 127.0.0.1) and output (pgoutput text, pgoutput binary, test_decoding).
# The figures in docs/benchmarks.md, "Session 4 figures", come from this script.
#
#   scripts/decode-floor.sh [--scale N] [--secs N]
#
# One throwaway cluster (removed at the end); six slots created before one backlog of
# `pgbench -c 4 -j 2 -T SECS -n` (after a CHECKPOINT, as in cutover-bench); each slot is
# drained once, to its end, into /dev/null. Prints one line per slot with its wall time.
set -euo pipefail
CUTOVER_TAG=decode-floor
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

scale=20
secs=30
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale="$2"; shift 2 ;;
    --secs) secs="$2"; shift 2 ;;
    *) die "unknown argument $1 (use --scale N, --secs N)" ;;
  esac
done

bindir="$(pg_config --bindir 2>/dev/null || true)"
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
fi
[ -x "$bindir/initdb" ] || die "no PostgreSQL server binaries (install postgresql)"

as_server() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

work="$(mktemp -d /tmp/cutover-decode-floor-XXXXXX)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cleanup() {
  as_server "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/sock"
if [ "$(id -u)" = 0 ]; then chown -R postgres "$work"; fi

say "cluster in $work (port $port), pgbench scale $scale, backlog of $secs s"
as_server "$bindir/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work/sock'
wal_level = logical
max_wal_size = 4GB
shared_buffers = 256MB
checkpoint_timeout = 30min
max_replication_slots = 20
max_wal_senders = 20
EOF
as_server "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null

sock=(-h "$work/sock" -p "$port" -U postgres)
tcp=(-h 127.0.0.1 -p "$port" -U postgres)
"$bindir/createdb" "${sock[@]}" bench
"$bindir/pgbench" "${sock[@]}" -i -s "$scale" -q bench >/dev/null 2>&1
"$bindir/psql" "${sock[@]}" -d bench -qX -c \
  "CREATE PUBLICATION floor_pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"

slots=(text_unix binary_unix testdec_unix text_tcp binary_tcp testdec_tcp)
for s in "${slots[@]}"; do
  plugin=pgoutput
  case "$s" in testdec_*) plugin=test_decoding ;; esac
  "$bindir/psql" "${sock[@]}" -d bench -qXAt -c \
    "SELECT 1 FROM pg_create_logical_replication_slot('$s', '$plugin')" >/dev/null
done

"$bindir/psql" "${sock[@]}" -d bench -qX -c CHECKPOINT
start="$("$bindir/psql" "${sock[@]}" -d bench -qXAt -c 'SELECT pg_current_wal_lsn()')"
txns="$("$bindir/pgbench" "${sock[@]}" -c 4 -j 2 -T "$secs" -n bench 2>&1 |
  sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')"
end="$("$bindir/psql" "${sock[@]}" -d bench -qXAt -c 'SELECT pg_current_wal_lsn()')"
wal="$("$bindir/psql" "${sock[@]}" -d bench -qXAt -c "SELECT pg_size_pretty(pg_wal_lsn_diff('$end', '$start'))")"
say "backlog: $txns transactions, $wal of WAL"

for s in "${slots[@]}"; do
  case "$s" in
    *_unix) conn=("${sock[@]}") ;;
    *) conn=("${tcp[@]}") ;;
  esac
  case "$s" in
    text_*) opts=(-o proto_version=1 -o publication_names=floor_pub) ;;
    binary_*) opts=(-o proto_version=1 -o publication_names=floor_pub -o binary=true) ;;
    *) opts=(-o skip-empty-xacts=1) ;;
  esac
  t0="$(date +%s.%N)"
  "$bindir/pg_recvlogical" "${conn[@]}" -d bench -S "$s" --start -E "$end" "${opts[@]}" \
    -F 0 -n -f /dev/null
  t1="$(date +%s.%N)"
  awk -v s="$s" -v a="$t0" -v b="$t1" -v n="$txns" \
    'BEGIN { printf "%-14s %6.2f s  %8.0f txns/s\n", s, b - a, n / (b - a) }'
done
