#!/usr/bin/env bash
# Load comparison of the proxy path on this machine.
#
# Contenders: direct to the upstream; nginx proxy_pass with upstream
# keepalive (when nginx is installed); the gateway on a public route; the
# gateway with a valid token. The proxy is pinned to CPU 0, the load
# generator and the upstream to CPU 1 (UPSTREAM_CPU=0 moves the upstream
# beside the proxy: then the direct path crosses between the CPUs as often
# as the proxied one, and the added latency is the proxy's own). Two phases:
#
# 1. CPU: proxy CPU microseconds per request, from /proc/PID/stat
#    (utime+stime) before and after a closed-loop wrk run (1 thread, 32
#    connections), and the requests/s of that run. The contenders take
#    short turns (SLICE seconds each) for ROUNDS rounds, in reverse order
#    every other round. nginx runs twice in each round, before and after
#    the gateway's turns, and each gateway figure is divided by the mean of
#    those two: this machine's speed drifts by a third within a minute, and
#    a ratio of turns seconds apart, bracketed, cancels most of that. The
#    second nginx turn is also reported against the first, as a control:
#    its spread is the spread of the measurement itself.
# 2. Latency: open-loop p50/p99 at a fixed RATE below capacity
#    (oha -q RATE --latency-correction, 32 connections), when oha is
#    installed; LAT_ROUNDS rounds of LAT_SECS seconds per contender, in
#    reverse order every other round. "p99 over direct" is the median of
#    each round's difference to that round's direct run. Beside each
#    proxy's p99 the script prints how long the proxy was ready to run but
#    kept waiting for its CPU (schedstat), which is the machine's share of
#    that tail: on a VM, other guests' processes and non-preemptible kernel
#    threads (kdamond, here) land on the lightly loaded proxy core.
#
# Each figure is the median of its rounds; the ratios also show their
# middle half (25th to 75th percentile).
#
# Needs: wrk (apt-get install wrk); optional nginx (apt-get install nginx-light)
# and oha (cargo install oha).
# Usage: bench/run.sh [rounds=15] [rate=5000] [slice-seconds=3]
#        (environment: LAT_ROUNDS=5, LAT_SECS=8, UPSTREAM_CPU=1: the upstream's
#        CPU; 0 puts it beside the proxy, so that the direct path crosses
#        between the CPUs as often as the proxied one does)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

ROUNDS=${1:-15}
RATE=${2:-5000}
SLICE=${3:-3}
LAT_ROUNDS=${LAT_ROUNDS:-5}
LAT_SECS=${LAT_SECS:-8}
UPSTREAM_CPU=${UPSTREAM_CPU:-1}
UP=127.0.0.1:18081
NGINX=127.0.0.1:18082
GW=127.0.0.1:18080
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin gateway --example bench_upstream
BIN=target/release/gateway
TCK=$(getconf CLK_TCK)

# run_queue_ns PIDS...: nanoseconds the threads of PIDS have spent ready to
# run but waiting for a CPU (schedstat's second field), in total.
# (A thread may exit between the glob and the read, and a kernel without
# schedstat has no such file: neither may end the run.)
run_queue_ns() {
  local p; for p in "$@"; do cat /proc/"$p"/task/*/schedstat 2>/dev/null || true; done |
    awk '{t += $2} END {printf "%.0f", t}'
}
cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }

# The upstream: nginx `return 200` if available, else a small hyper server.
nginx_conf() { # NAME SERVER-BLOCK
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1; proxy_temp_path $WORK/$1;
  fastcgi_temp_path $WORK/$1; uwsgi_temp_path $WORK/$1; scgi_temp_path $WORK/$1;
  keepalive_requests 1000000;
  $2
}
CONF
}
if command -v nginx >/dev/null; then
  nginx_conf upstream "server { listen $UP; location / { return 200 \"ok\\n\"; } }"
  nginx_conf proxy "upstream backend { server $UP; keepalive 64; }
  server { listen $NGINX; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  taskset -c "$UPSTREAM_CPU" nginx -c "$WORK/upstream/nginx.conf" -g 'daemon off;' & PIDS+=($!)
  taskset -c 0 nginx -c "$WORK/proxy/nginx.conf" -g 'daemon off;' & NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)
  HAVE_NGINX=1
else
  taskset -c "$UPSTREAM_CPU" target/release/examples/bench_upstream "$UP" & PIDS+=($!)
  HAVE_NGINX=0
fi
wait_port "$UP"

bench_config "$WORK/gateway.toml" "$GW" "127.0.0.1:19090" "$UP"
bench_user "$BIN" "$WORK/gateway.toml"
RUST_LOG=warn taskset -c 0 "$BIN" --config "$WORK/gateway.toml" serve & GW_PID=$!; PIDS+=($GW_PID)
wait_port "$GW"
sleep 0.5
IDLE_RSS=$(awk '/VmRSS/ {print $2}' /proc/$GW_PID/status)
# Memory per idle keep-alive connection: 1000 connections, one request each, left open.
CONN_KB=$(python3 - "$GW" "$GW_PID" <<'PY'
import socket, sys
host, port = sys.argv[1].split(":"); pid = sys.argv[2]
def rss():
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
base = rss(); socks = []
for _ in range(1000):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /public/x HTTP/1.1\r\nHost: bench\r\n\r\n")
    s.recv(65536); socks.append(s)
print(f"{(rss() - base) / 1000:.1f}")
for s in socks: s.close()
PY
)
TOKEN=$(bench_token "$GW")

nginx_pids() { echo "$NGINX_MASTER $(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"; }

# cpu_run URL "PIDS to charge" [extra wrk args...]: prints "cpu rps"
# (cpu "-" when no PIDS are charged).
cpu_run() {
  local url=$1 pids=$2; shift 2
  local before after out reqs rps cpu=-
  [ -n "$pids" ] && before=$(cpu_ticks $pids)
  out=$(taskset -c 1 wrk -t1 -c32 -d"${SLICE}s" "$@" "$url")
  [ -n "$pids" ] && after=$(cpu_ticks $pids)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
  if [ -n "$pids" ]; then
    cpu=$(awk -v t=$((after - before)) -v n="$reqs" -v hz="$TCK" 'BEGIN {printf "%.3f", t * 1e6 / hz / n}')
  fi
  echo "$cpu $rps"
}

# latency_run URL [extra args...]: prints "p50 p99" in ms
latency_run() {
  local url=$1; shift
  taskset -c 1 oha --no-tui -z "${LAT_SECS}s" -q "$RATE" --latency-correction -c 32 "$@" "$url" 2>/dev/null |
    awk 'function ms(v, u) { return u == "secs" ? v * 1000 : (u == "ms" ? v : v / 1000) }
         /50.00% in/ {p50 = ms($3, $4)} /99.00% in/ {p99 = ms($3, $4)}
         END {printf "%.3f %.3f", p50, p99}'
}

# quantile Q: the Q-quantile (0..1, linear between ranks) of the numbers
# on stdin ("-" when there are none).
quantile() {
  sort -g | awk -v q="$1" '{v[NR] = $1}
    END {if (NR == 0) {print "-"; exit}
         r = 1 + q * (NR - 1); i = int(r); f = r - i
         printf "%.3f\n", (i < NR) ? v[i] + f * (v[i + 1] - v[i]) : v[i]}'
}
median() { quantile 0.5; }

# The contenders: index, name, URL, PIDs charged, extra wrk/oha arguments.
NAMES=("direct")
URLS=("http://$UP/public/x")
CHARGE=("")
ARGS=("")
if [ "$HAVE_NGINX" = 1 ]; then
  NAMES+=("nginx proxy_pass"); URLS+=("http://$NGINX/public/x"); CHARGE+=("$(nginx_pids)"); ARGS+=("")
fi
NAMES+=("gateway, public route" "gateway, valid token")
URLS+=("http://$GW/public/x" "http://$GW/api/x")
CHARGE+=("$GW_PID" "$GW_PID")
ARGS+=("" "Authorization: Bearer $TOKEN")
# The CPU phase's turn order: nginx again after the gateway's turns.
ORDER=("${!NAMES[@]}")
[ "$HAVE_NGINX" = 1 ] && ORDER+=("again")

run_cpu() { # INDEX|again
  local i=$1
  [ "$i" = again ] && i=1
  if [ -n "${ARGS[$i]}" ]; then cpu_run "${URLS[$i]}" "${CHARGE[$i]}" -H "${ARGS[$i]}"; else cpu_run "${URLS[$i]}" "${CHARGE[$i]}"; fi
}

for i in "${!NAMES[@]}"; do # warm-up: pools, caches, lazy registrations
  if [ -n "${ARGS[$i]}" ]; then taskset -c 1 wrk -t1 -c32 -d2s -H "${ARGS[$i]}" "${URLS[$i]}" >/dev/null
  else taskset -c 1 wrk -t1 -c32 -d2s "${URLS[$i]}" >/dev/null; fi
done

# turn_order ROUND ITEMS...: the items, one per line, in reverse order in
# even rounds (so that no contender always follows the same one).
turn_order() {
  local round=$1 k; shift
  if [ $((round % 2)) = 0 ]; then for ((k = $#; k >= 1; k--)); do echo "${!k}"; done; else printf '%s\n' "$@"; fi
}

declare -A CPU RPS LAT
for i in "${ORDER[@]}"; do CPU[$i]=""; RPS[$i]=""; LAT[$i]=""; done
for round in $(seq "$ROUNDS"); do
  echo "CPU round $round of $ROUNDS" >&2
  mapfile -t turns < <(turn_order "$round" "${ORDER[@]}")
  for i in "${turns[@]}"; do
    read -r cpu rps < <(run_cpu "$i")
    CPU[$i]+="$cpu"$'\n'; RPS[$i]+="$rps"$'\n'
  done
done
if command -v oha >/dev/null; then
  for round in $(seq "$LAT_ROUNDS"); do
    echo "latency round $round of $LAT_ROUNDS" >&2
    mapfile -t turns < <(turn_order "$round" "${!NAMES[@]}")
    for i in "${turns[@]}"; do
      # The proxy's time spent ready but kept off its CPU (by other
      # processes or kernel threads) in this turn: the machine's share of
      # its tail, shown beside it.
      waited=-; [ -n "${CHARGE[$i]}" ] && waited=$(run_queue_ns ${CHARGE[$i]})
      if [ -n "${ARGS[$i]}" ]; then lat=$(latency_run "${URLS[$i]}" -H "${ARGS[$i]}"); else lat=$(latency_run "${URLS[$i]}"); fi
      [ -n "${CHARGE[$i]}" ] && waited=$(awk -v a="$waited" -v b="$(run_queue_ns ${CHARGE[$i]})" 'BEGIN {printf "%.1f", (b - a) / 1e6}')
      LAT[$i]+="$lat $waited"$'\n'
      echo "  ${NAMES[$i]}: p50 p99 $lat, waited for the CPU $waited ms" >&2
    done
  done
fi

col() { awk -v c="$2" 'NF && $c != "-" {print $c}' <<<"$1"; }
# ratios INDEX: this contender's CPU in each round over the mean of the
# round's two nginx turns (for "again": over the first nginx turn).
ratios() {
  if [ "$1" = again ]; then
    paste -d' ' <(col "${CPU[again]}" 1) <(col "${CPU[1]}" 1) | awk '{printf "%.4f\n", $1 / $2}'
  else
    paste -d' ' <(col "${CPU[$1]}" 1) <(col "${CPU[1]}" 1) <(col "${CPU[again]}" 1) |
      awk '{printf "%.4f\n", 2 * $1 / ($2 + $3)}'
  fi
}
echo
echo "CPU: median of $ROUNDS rounds of ${SLICE} s turns; latency: median of $LAT_ROUNDS rounds of ${LAT_SECS} s at ${RATE}/s"
echo
echo "| contender                  | CPU µs/req | × nginx (per round) | middle half | req/s (wrk) | p50 ms | p99 ms | p99 over direct (middle half) |"
echo "| --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: |"
for i in "${ORDER[@]}"; do
  if [ "$i" = again ]; then name="nginx, second turn (control)"; else name=${NAMES[$i]}; fi
  cpu=$(col "${CPU[$i]}" 1 | median); rps=$(col "${RPS[$i]}" 1 | median | awk '{print ($1 == "-") ? "-" : sprintf("%d", $1)}')
  p50=-; p99=-; over=-
  if [ "$i" != again ] && [ -n "${LAT[$i]:-}" ]; then
    p50=$(col "${LAT[$i]}" 1 | median); p99=$(col "${LAT[$i]}" 2 | median)
    # Within each round, as the CPU ratios: the median of the differences.
    # Its middle half, as for the ratios, shows how far single rounds stray.
    d=$(paste -d' ' <(col "${LAT[$i]}" 2) <(col "${LAT[0]}" 2) | awk '{printf "%.4f\n", $1 - $2}')
    over=$(median <<<"$d" | awk '{printf "%+.3f", $1}')
    [ "$i" != 0 ] && over+=" ($(quantile 0.25 <<<"$d" | awk '{printf "%+.2f", $1}')…$(quantile 0.75 <<<"$d" | awk '{printf "%+.2f", $1}'))"
  fi
  ratio=-; half=-
  if [ "$HAVE_NGINX" = 1 ] && [ "$ROUNDS" -gt 0 ] && [ -n "${CHARGE[${i/again/1}]}" ] && [ "$i" != 1 ]; then
    r=$(ratios "$i")
    ratio=$(median <<<"$r" | awk '{printf "%.2f", $1}')
    half="$(quantile 0.25 <<<"$r" | awk '{printf "%.2f", $1}')–$(quantile 0.75 <<<"$r" | awk '{printf "%.2f", $1}')"
  fi
  printf "| %-26s | %10s | %7s | %11s | %11s | %6s | %6s | %s |\n" "$name" "$cpu" "$ratio" "$half" "$rps" "$p50" "$p99" "$over"
done
echo
[ "$ROUNDS" -gt 0 ] && echo "CPU µs/req in each round:"
for i in "${ORDER[@]}"; do
  if [ "$i" = again ]; then name="nginx, second turn"; else name=${NAMES[$i]}; fi
  [ -n "${CHARGE[${i/again/1}]}" ] && [ "$ROUNDS" -gt 0 ] && printf "  %-26s %s\n" "$name" "$(col "${CPU[$i]}" 1 | tr '\n' ' ')"
done
if [ -n "${LAT[0]:-}" ]; then
  echo
  echo "p99 ms in each latency round (in brackets: ms the proxy was ready to run but kept waiting for its CPU):"
  for i in "${!NAMES[@]}"; do
    printf "  %-26s %s\n" "${NAMES[$i]}" "$(awk 'NF {printf "%s%s ", $2, ($3 == "-" ? "" : " (" $3 ")")}' <<<"${LAT[$i]}")"
  done
fi
echo
echo "gateway RSS: idle after start ${IDLE_RSS} kB; per idle keep-alive connection ${CONN_KB} kB;" \
  "after login and the runs $(awk '/VmRSS/ {print $2}' /proc/$GW_PID/status) kB"
