# Shared by the bench scripts (sourced, not run): the gateway's bench
# config, its bench user and token, and waiting for a port.

# wait_port HOST:PORT
wait_port() {
  for _ in $(seq 400); do (exec 3<>/dev/tcp/${1%:*}/${1#*:}) 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing on $1" >&2
  exit 1
}

# bench_config FILE GATEWAY ADMIN UPSTREAM [extra [server] line]: a public
# route /public and a route /api that needs the scope "bench", both to
# UPSTREAM; SQLite and keys next to FILE.
bench_config() {
  cat > "$1" <<CONF
[server]
listen = "$2"
${5:-}
[admin]
listen = "$3"
[database]
url = "sqlite://gateway.db"
[auth]
keys_dir = "keys"
[log]
access = false
[[routes]]
name = "public"
prefix = "/public"
upstreams = ["http://$4"]
auth = "public"
[[routes]]
name = "api"
prefix = "/api"
upstreams = ["http://$4"]
scopes = ["bench"]
CONF
}

BENCH_EMAIL=bench@example.com
BENCH_PASSWORD='correct horse battery staple'

# bench_user BIN CONFIG: creates the bench user (scope "bench").
bench_user() {
  echo "$BENCH_PASSWORD" | "$1" --config "$2" user create \
    --tenant default --email "$BENCH_EMAIL" --scope bench --password-stdin >/dev/null
}

# bench_token GATEWAY: logs the bench user in and prints the access token.
bench_token() {
  curl -s -X POST "http://$1/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$BENCH_EMAIL\",\"password\":\"$BENCH_PASSWORD\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
