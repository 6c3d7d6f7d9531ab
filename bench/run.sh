#!/usr/bin/env bash
# Load comparison of the proxy path on this machine.
#
# Contenders: direct to the upstream; nginx proxy_pass with upstream
# keepalive (when nginx is installed); the gateway on a public route; the
# gateway with a valid token. The proxy is pinned to CPU 0, the load
# generator and the upstream to CPU 1. For each contender it prints:
#   - proxy CPU microseconds per request, from /proc/PID/stat (utime+stime)
#     before and after a closed-loop run: the figure that stays stable on a
#     noisy machine; and its ratio to nginx's, taken within each round;
#   - closed-loop requests/s (wrk, 1 thread, 32 connections);
#   - open-loop latency p50/p99 at a fixed rate below capacity
#     (oha -q RATE --latency-correction), when oha is installed.
#
# Needs: wrk (apt-get install wrk); optional nginx (apt-get install nginx-light)
# and oha (cargo install oha). Usage: bench/run.sh [seconds] [rate] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
source bench/common.sh

SECS=${1:-10}
RATE=${2:-5000}
ROUNDS=${3:-3}
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
  taskset -c 1 nginx -c "$WORK/upstream/nginx.conf" -g 'daemon off;' & PIDS+=($!)
  taskset -c 0 nginx -c "$WORK/proxy/nginx.conf" -g 'daemon off;' & NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)
  HAVE_NGINX=1
else
  taskset -c 1 target/release/examples/bench_upstream "$UP" & PIDS+=($!)
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

# measure URL "PIDS to charge" [extra wrk args...]: prints "cpu rps p50 p99"
# ("-" for what was not measured).
measure() {
  local url=$1 pids=$2; shift 2
  taskset -c 1 wrk -t1 -c32 -d2s "$@" "$url" >/dev/null  # warm-up
  local before after out reqs rps cpu=- p50=- p99=-
  [ -n "$pids" ] && before=$(cpu_ticks $pids)
  out=$(taskset -c 1 wrk -t1 -c32 -d"${SECS}s" "$@" "$url")
  [ -n "$pids" ] && after=$(cpu_ticks $pids)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
  if [ -n "$pids" ]; then
    cpu=$(awk -v t=$((after - before)) -v n="$reqs" -v hz="$TCK" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}')
  fi
  if command -v oha >/dev/null; then
    read -r p50 p99 < <(taskset -c 1 oha --no-tui -z "${SECS}s" -q "$RATE" --latency-correction -c 32 "$@" "$url" \
      2>/dev/null | awk 'function ms(v, u) { return u == "secs" ? v * 1000 : (u == "ms" ? v : v / 1000) }
           /50.00% in/ {p50 = ms($3, $4)} /99.00% in/ {p99 = ms($3, $4)}
           END {printf "%.3f %.3f", p50, p99}')
  fi
  echo "$cpu $rps $p50 $p99"
}

# median of the numbers on stdin ("-" when there are none)
median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# The contenders take turns, round after round, so that a slow spell of
# the machine falls on all of them; each figure is the median of its rounds.
NAMES=("direct")
URLS=("http://$UP/public/x")
CHARGE=("")
if [ "$HAVE_NGINX" = 1 ]; then NAMES+=("nginx proxy_pass"); URLS+=("http://$NGINX/public/x"); CHARGE+=("$(nginx_pids)"); fi
NAMES+=("gateway, public route" "gateway, valid token")
URLS+=("http://$GW/public/x" "http://$GW/api/x")
CHARGE+=("$GW_PID" "$GW_PID")
declare -A RESULTS
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for i in "${!NAMES[@]}"; do
    if [ "${NAMES[$i]}" = "gateway, valid token" ]; then
      RESULTS[$i]+="$(measure "${URLS[$i]}" "${CHARGE[$i]}" -H "Authorization: Bearer $TOKEN")"$'\n'
    else
      RESULTS[$i]+="$(measure "${URLS[$i]}" "${CHARGE[$i]}")"$'\n'
    fi
  done
done

col() { awk -v c="$2" 'NF && $c != "-" {print $c}' <<<"${RESULTS[$1]}" | median; }
NGINX_CPU=-
[ "$HAVE_NGINX" = 1 ] && NGINX_CPU=$(col 1 1)
DIRECT_P99=$(col 0 4)
echo
echo "median of $ROUNDS rounds; rate for latency: ${RATE}/s"
echo
echo "| contender                  | CPU us/req | x nginx (per round) | req/s (wrk) | p50 ms | p99 ms | p99 over direct |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for i in "${!NAMES[@]}"; do
  cpu=$(col "$i" 1); rps=$(col "$i" 2); p50=$(col "$i" 3); p99=$(col "$i" 4)
  # The ratio is taken within each round (the two ran seconds apart) and
  # the median of those is shown: this machine's speed drifts between
  # rounds by more than the difference being measured.
  ratio=-
  if [ "$NGINX_CPU" != - ] && [ "$cpu" != - ]; then
    ratio=$(paste -d' ' <(awk 'NF {print $1}' <<<"${RESULTS[$i]}") <(awk 'NF {print $1}' <<<"${RESULTS[1]}") |
      awk '$1 != "-" && $2 != "-" {printf "%.4f\n", $1 / $2}' | median)
    ratio=$(awk -v r="$ratio" 'BEGIN {printf "%.2f", r}')
  fi
  over=$(awk -v a="$p99" -v b="$DIRECT_P99" 'BEGIN {if (a == "-" || b == "-") print "-"; else printf "%+.3f", a - b}')
  printf "| %-26s | %10s | %7s | %11s | %6s | %6s | %15s |\n" "${NAMES[$i]}" "$cpu" "$ratio" "$rps" "$p50" "$p99" "$over"
done
echo
echo "CPU us/req in each round:"
for i in "${!NAMES[@]}"; do
  [ -n "${CHARGE[$i]}" ] && printf "  %-26s %s\n" "${NAMES[$i]}" "$(awk 'NF {printf "%s ", $1}' <<<"${RESULTS[$i]}")"
done
echo
echo "gateway RSS: idle after start ${IDLE_RSS} kB; per idle keep-alive connection ${CONN_KB} kB;" \
  "after login and the runs $(awk '/VmRSS/ {print $2}' /proc/$GW_PID/status) kB"
