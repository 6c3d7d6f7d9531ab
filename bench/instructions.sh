#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's
# callgrind: a figure that repeats run after run whatever else the machine
# does (CPU time per request varies by several percent here), so it shows
# whether a change to the hot path made it cheaper. It leaves out the kernel
# (about half of the real cost per request, see bench/run.sh) and says
# nothing about cache misses.
#
# The gateway runs under callgrind with one worker; after a warm-up the
# counters are zeroed, a fixed-length load runs (wrk, 8 connections), and
# the counters are dumped. Prints instructions per request for the public
# route and for the route that needs a valid token.
#
# Needs: valgrind, wrk. Usage: bench/instructions.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

SECS=${1:-10}
UP=127.0.0.1:18181
GW=127.0.0.1:18180
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is required" >&2; exit 1; }
cargo build --release --quiet --bin gateway --example bench_upstream
BIN=target/release/gateway


target/release/examples/bench_upstream "$UP" & PIDS+=($!)
wait_port "$UP"

bench_config "$WORK/gateway.toml" "$GW" "127.0.0.1:19190" "$UP" "workers = 1"
bench_user "$BIN" "$WORK/gateway.toml"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
  "$BIN" --config "$WORK/gateway.toml" serve 2>"$WORK/valgrind.log" & VG=$!; PIDS+=($VG)
wait_port "$GW"
TOKEN=$(bench_token "$GW")

# run NAME URL [extra wrk args...]
run() {
  local name=$1 url=$2; shift 2
  wrk -t1 -c8 -d2s "$@" "$url" >/dev/null # warm-up: pool, caches, lazy registrations
  callgrind_control -z "$VG" >/dev/null 2>&1
  local out reqs
  out=$(wrk -t1 -c8 -d"${SECS}s" "$@" "$url")
  callgrind_control -d "$VG" >/dev/null 2>&1
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  local dump
  dump=$(ls -t "$WORK"/cg.out.* | head -1)
  local ir
  ir=$(awk '/^summary:/ {print $2}' "$dump")
  printf "| %-22s | %9d | %12d |\n" "$name" "$reqs" $((ir / reqs))
  rm -f "$WORK"/cg.out.*
}

echo
echo "| route                  |  requests | instr/request |"
echo "| --- | ---: | ---: |"
run "public" "http://$GW/public/x"
run "valid token" "http://$GW/api/x" -H "Authorization: Bearer $TOKEN"
