#!/usr/bin/env bash
# Idle clients (issue 5): N concurrent idle, authenticated client connections (default
# 10,000) on a server budget of POOL_SIZE (20) connections, through pgtenant (JWT password)
# and through PgBouncer in transaction mode (SCRAM) for comparison. Reports each proxy's RSS
# before and after, KiB per idle client, and whether a fresh client can still run a query
# while all of them are open. The clients are opened by `examples/idle_clients.rs`
# (tokio-postgres, no TLS, loopback), at most CONCURRENCY at a time.
#
#   scripts/idle-clients.sh                           # 10,000 clients, budget 20
#   CLIENTS=2000 TARGETS=pgtenant scripts/idle-clients.sh
#   PGTENANT_POOL_MODE=transaction scripts/idle-clients.sh
#
# pgtenant in session mode (the default until transaction pooling lands) pins a server
# connection per client, so at most POOL_SIZE clients get in; the others wait for a server
# connection and are refused (53300) after checkout_timeout. The report says so: holding
# 10,000 clients on 20 server connections is transaction mode's job.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-10000}
POOL_SIZE=${POOL_SIZE:-20}
CONCURRENCY=${CONCURRENCY:-200}
TARGETS=${TARGETS:-"pgtenant pgbouncer"}
SCALE=${SCALE:-1}
PGTENANT_POOL_MODE=${PGTENANT_POOL_MODE:-}
PGPORT=${PGPORT:-55437}; BOUNCER_PORT=${BOUNCER_PORT:-56437}; PROXY_PORT=${PROXY_PORT:-57437}
. scripts/bench-lib.sh

# Every client is a file descriptor in the proxy and one in the client tool.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CLIENTS + 200)) ]; then
    echo "error: ulimit -n is $(ulimit -n) (hard limit $(ulimit -Hn)); $CLIENTS clients need at least $((CLIENTS + 200))" >&2
    exit 2
fi
command -v pgbouncer >/dev/null || apt-get install -y -qq pgbouncer >/dev/null
build_pgtenant
cargo build --release --quiet --example idle_clients
IDLE=$PWD/target/release/examples/idle_clients

BENCH_PID_VARS="PROXY_PID BOUNCER_PID"
bench_workdir
start_postgres
create_bench_db
make_token
mode=${PGTENANT_POOL_MODE:-session}

# idle TARGET PORT PID PASSWORD: runs the tool, its key=value report in $WORK/idle-TARGET.
idle() {
    echo "$1: opening $CLIENTS idle clients ..." >&2
    IDLE_PASSWORD=$4 "$IDLE" --target "$1" --port "$2" --pid "$3" --user bench_app \
        --dbname bench_db --clients "$CLIENTS" --concurrency "$CONCURRENCY" > "$WORK/idle-$1"
    sed 's/^/  /' "$WORK/idle-$1" >&2
}
val() { sed -n "s/^$2=//p" "$WORK/idle-$1"; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

for t in $TARGETS; do
    case $t in
        pgtenant)
            PGTENANT_POOL_SIZE=$POOL_SIZE
            {
                pgtenant_config "$PROXY_PORT"
                printf '[limits]\nmax_client_connections = %d\n' $((CLIENTS + 100))
            } > "$WORK/pgtenant.toml"
            if ! RUST_BACKTRACE=0 "$PGTENANT" check-config --config "$WORK/pgtenant.toml" >"$WORK/check.log" 2>&1; then
                if grep -q 'unknown field .pool_mode.' "$WORK/check.log"; then
                    echo "error: this pgtenant build does not know upstreams.X.pool_mode: transaction pooling has not landed here." >&2
                fi
                sed '/^Stack backtrace/,$d' "$WORK/check.log" >&2
                exit 3
            fi
            start_pgtenant "$WORK/pgtenant.toml" "$WORK/pgtenant.log"
            PROXY_PID=$STARTED_PID
            wait_port "$PROXY_PORT" 20 || { cat "$WORK/pgtenant.log" >&2; exit 1; }
            idle pgtenant "$PROXY_PORT" "$PROXY_PID" "$TOKEN"
            kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true; PROXY_PID=
            ;;
        pgbouncer)
            bouncer_userlist
            BOUNCER_POOL_SIZE=$POOL_SIZE BOUNCER_MAX_CLIENTS=$((CLIENTS + 100))
            start_bouncer transaction
            idle pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID" "$PASSWORD"
            stop_bouncer
            ;;
        *) echo "unknown target '$t' (pgtenant, pgbouncer)" >&2; exit 2 ;;
    esac
done

echo
echo "$CLIENTS idle clients (opened $CONCURRENCY at a time, no TLS, loopback), server budget $POOL_SIZE, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "| target | auth | server connections | clients connected | still open | failed | RSS before MiB | RSS after MiB | KiB per idle client | fresh client's query |"
echo "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"
for t in $TARGETS; do
    case $t in
        pgtenant) name="pgtenant $mode"; auth=JWT ;;
        *) name="PgBouncer $(bouncer_version) transaction"; auth=SCRAM ;;
    esac
    echo "| $name | $auth | $POOL_SIZE | $(val "$t" connected) of $CLIENTS | $(val "$t" alive) | $(val "$t" failed) | $(mib "$(val "$t" rss_before_kib)") | $(mib "$(val "$t" rss_after_kib)") | $(val "$t" kib_per_client) | $(val "$t" fresh_query) |"
done
for t in $TARGETS; do
    errors=$(val "$t" errors)
    if [ -n "$errors" ]; then echo; echo "- $t errors: $errors"; fi
done
if [[ " $TARGETS " == *" pgtenant "* ]] && [ "$mode" = session ] && [ "$CLIENTS" -gt "$POOL_SIZE" ]; then
    echo
    echo "- pgtenant ran in **session mode**: every session pins one of the $POOL_SIZE server connections, so at most $POOL_SIZE clients can be connected at once and the rest are refused after checkout_timeout. Holding $CLIENTS idle clients on $POOL_SIZE server connections needs transaction pooling (PGTENANT_POOL_MODE=transaction)."
fi
