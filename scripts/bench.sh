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
PGPORT=${PGPORT:-55433}; BOUNCER_PORT=${BOUNCER_PORT:-56432}; PROXY_PORT=${PROXY_PORT:-57432}
. scripts/bench-lib.sh

command -v pgbouncer >/dev/null || { apt-get install -y -qq pgbouncer >/dev/null; }
build_pgtenant

BENCH_PID_VARS="PROXY_PID BOUNCER_PID"
bench_workdir
start_postgres
create_bench_db

# PgBouncer: SCRAM to clients and server, one pool per mode is chosen per run via pool_mode.
bouncer_userlist

# pgtenant: tenant "bench" routed to its dedicated database.
make_token
pgtenant_config "$PROXY_PORT" > "$WORK/pgtenant.toml"
start_pgtenant "$WORK/pgtenant.toml" "$WORK/pgtenant.log"
PROXY_PID=$STARTED_PID
sleep 0.5

for _ in $(seq "$REPS"); do
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
for proto in $PROTOCOLS "connect (-C)"; do
    direct_tps=$(results_col "direct|$proto" 1 | median)
    for target in direct pgbouncer-session pgbouncer-transaction pgtenant-session; do
        key="$target|$proto"
        [ -z "${RESULTS["$key"]:-}" ] && continue
        tps=$(results_col "$key" 1 | median | awk '{printf "%.0f", $1}')
        lat=$(results_col "$key" 2 | median)
        failed=$(results_col "$key" 3 | awk '{s+=$1} END{print s+0}')
        cpu=$(results_col "$key" 4 | awk '$1!="–"' | median)
        [ "$target" = direct ] && cpu="–"
        ratio=$(awk -v a="$tps" -v b="$direct_tps" 'BEGIN{if(b>0) printf "%.2f", a/b; else print "–"}')
        echo "| $target | $proto | $tps | $lat | $failed | $cpu | $ratio |"
    done
done
