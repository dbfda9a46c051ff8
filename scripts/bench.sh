#!/usr/bin/env bash
# Side-by-side benchmark: direct PostgreSQL vs PgBouncer vs pgtenant, in one run, alternating.
# Starts a throwaway PostgreSQL, PgBouncer (apt) and pgtenant (release build), runs a pgbench
# matrix, counts failed transactions, and prints a Markdown table of TPS, average latency and
# proxy CPU µs per transaction (utime+stime from /proc before/after each run).
#
#   scripts/bench.sh                 # defaults: 15 s runs, 8 clients, 2 repetitions
#   DURATION=20 CLIENTS=8 REPS=2 SCALE=10 scripts/bench.sh
#   WORKERS=1 scripts/bench.sh       # pgtenant with one tokio worker thread
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-8}
REPS=${REPS:-2}
SCALE=${SCALE:-10}
PROTOCOLS=${PROTOCOLS:-"simple extended prepared"}
BIN=$(pg_config --bindir)
PGPORT=${PGPORT:-55433}; BOUNCER_PORT=${BOUNCER_PORT:-56432}; PROXY_PORT=${PROXY_PORT:-57432}

command -v pgbouncer >/dev/null || { apt-get install -y -qq pgbouncer >/dev/null; }
cargo build --release --quiet
PGTENANT=$PWD/target/release/pgtenant

WORK=$(mktemp -d /tmp/pgtenant-bench.XXXXXX)
chmod 755 "$WORK"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
cleanup() {
    [ -n "${PROXY_PID:-}" ] && kill "$PROXY_PID" 2>/dev/null || true
    [ -n "${BOUNCER_PID:-}" ] && kill "$BOUNCER_PID" 2>/dev/null || true
    as_pg "$BIN/pg_ctl" -D "$WORK/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

PASSWORD=benchpw$RANDOM$RANDOM
as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w \
    -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off" start >/dev/null
psql_admin() { as_pg "$BIN/psql" -h "$WORK" -p "$PGPORT" -U postgres -qAt "$@"; }
psql_admin -c "CREATE ROLE bench_app LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE bench_db OWNER bench_app"
PGPASSWORD=$PASSWORD "$BIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U bench_app -i -s "$SCALE" -q bench_db >/dev/null 2>&1

# PgBouncer: SCRAM to clients and server, one pool per mode is chosen per run via pool_mode.
SCRAM_SECRET=$(psql_admin -c "SELECT rolpassword FROM pg_authid WHERE rolname='bench_app'")
echo "\"bench_app\" \"$SCRAM_SECRET\"" > "$WORK/userlist.txt"
start_bouncer() {
    cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench_db = host=127.0.0.1 port=$PGPORT dbname=bench_db
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = $1
default_pool_size = 20
max_client_conn = 500
logfile = $WORK/pgbouncer.log
INI
    [ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
    as_pg pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
    sleep 0.5
    BOUNCER_PID=$(pgrep -n -f "pgbouncer $WORK/pgbouncer.ini")
}
stop_bouncer() { kill "$BOUNCER_PID" 2>/dev/null || true; sleep 0.3; BOUNCER_PID=; }

# pgtenant: tenant "bench" routed to its dedicated database.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/jwt.key"
cat > "$WORK/pgtenant.toml" <<TOML
[listen]
addr = "127.0.0.1:$PROXY_PORT"
tls = "disable"
[jwt]
secret_file = "$WORK/jwt.key"
[upstreams.bench]
kind = "dedicated"
url = "postgres://bench_app:$PASSWORD@127.0.0.1:$PGPORT/bench_db"
pool_size = 20
[tenants]
bench = "bench"
[runtime]
${WORKERS:+worker_threads = $WORKERS}
TOML
PGTENANT_LOG=warn "$PGTENANT" serve --config "$WORK/pgtenant.toml" 2>"$WORK/pgtenant.log" &
PROXY_PID=$!
sleep 0.5
TOKEN=$("$PGTENANT" token --secret-file "$WORK/jwt.key" --tenant bench --sub bench --ttl 86400)

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# run TARGET PORT PASSWORD PROTOCOL [extra pgbench args] -> "tps lat_ms failed cpu_us_per_txn"
run() {
    local pid=$1 port=$2 pw=$3 proto=$4; shift 4
    local before=0 after=0
    [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    local out
    out=$(PGPASSWORD=$pw "$BIN/pgbench" -h 127.0.0.1 -p "$port" -U bench_app -S -M "$proto" \
        -c "$CLIENTS" -j 2 -T "$DURATION" -n "$@" bench_db 2>&1 || true)
    [ -n "$pid" ] && after=$(cpu_ticks "$pid")
    local tps lat txns failed
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\).*/\1/p' <<<"$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    errors=$(grep -c -i 'error\|fatal' <<<"$out" || true)
    local cpu="–"
    if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        cpu=$(awk -v d=$((after - before)) -v t="$TICK" -v n="$txns" 'BEGIN{printf "%.1f", d/t*1e6/n}')
    fi
    echo "${tps:-0} ${lat:-–} ${failed:-$errors} $cpu"
}

declare -A RESULTS
record() { RESULTS["$1"]+="$2;"; }

for rep in $(seq "$REPS"); do
    for proto in $PROTOCOLS; do
        record "direct|$proto" "$(run "" "$PGPORT" "$PASSWORD" "$proto")"
        start_bouncer session
        record "pgbouncer-session|$proto" "$(run "$BOUNCER_PID" "$BOUNCER_PORT" "$PASSWORD" "$proto")"
        stop_bouncer
        if [ "$proto" != prepared ]; then
            start_bouncer transaction
            record "pgbouncer-transaction|$proto" "$(run "$BOUNCER_PID" "$BOUNCER_PORT" "$PASSWORD" "$proto")"
            stop_bouncer
        fi
        record "pgtenant-session|$proto" "$(run "$PROXY_PID" "$PROXY_PORT" "$TOKEN" "$proto")"
    done
    # Connect per transaction (-C): SCRAM to PostgreSQL / PgBouncer vs a JWT to pgtenant.
    record "direct|connect (-C)" "$(run "" "$PGPORT" "$PASSWORD" simple -C)"
    start_bouncer transaction
    record "pgbouncer-transaction|connect (-C)" "$(run "$BOUNCER_PID" "$BOUNCER_PORT" "$PASSWORD" simple -C)"
    stop_bouncer
    record "pgtenant-session|connect (-C)" "$(run "$PROXY_PID" "$PROXY_PORT" "$TOKEN" simple -C)"
done

echo
echo "pgbench -S, scale $SCALE, $CLIENTS clients, ${DURATION}s x $REPS, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| target | protocol | TPS (median) | latency ms | failed | proxy CPU µs/txn | TPS vs direct |"
echo "|---|---|--:|--:|--:|--:|--:|"
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{if(NR==0){print 0}else if(NR%2){print a[(NR+1)/2]}else{printf "%.1f", (a[NR/2]+a[NR/2+1])/2}}'; }
for proto in $PROTOCOLS "connect (-C)"; do
    direct_tps=$(tr ';' '\n' <<<"${RESULTS["direct|$proto"]}" | awk 'NF{print $1}' | median)
    for target in direct pgbouncer-session pgbouncer-transaction pgtenant-session; do
        rows=${RESULTS["$target|$proto"]:-}
        [ -z "$rows" ] && continue
        tps=$(tr ';' '\n' <<<"$rows" | awk 'NF{print $1}' | median | awk '{printf "%.0f", $1}')
        lat=$(tr ';' '\n' <<<"$rows" | awk 'NF{print $2}' | median)
        failed=$(tr ';' '\n' <<<"$rows" | awk 'NF{s+=$3} END{print s+0}')
        cpu=$(tr ';' '\n' <<<"$rows" | awk 'NF && $4!="–"{print $4}' | median)
        [ "$target" = direct ] && cpu="–"
        ratio=$(awk -v a="$tps" -v b="$direct_tps" 'BEGIN{if(b>0) printf "%.2f", a/b; else print "–"}')
        echo "| $target | $proto | $tps | $lat | $failed | $cpu | $ratio |"
    done
done
