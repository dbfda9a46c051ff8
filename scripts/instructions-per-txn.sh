#!/usr/bin/env bash
# Instructions per transaction (issue 5), the noise-free companion of bench-pooling.sh:
# wall-clock CPU per transaction on a shared 2-core VM moves by ±20% between runs, user-space
# instruction counts under callgrind do not. Runs pgtenant (transaction mode, TLS, JWT) and
# PgBouncer (transaction mode, TLS, SCRAM) under `valgrind --tool=callgrind`, drives each with
# pgbench -S at two transaction counts, and reports (Ir(long) - Ir(short)) / extra
# transactions: the steady-state cost of one transaction, without startup, TLS handshakes
# or authentication (both runs pay those equally). Kernel time is not counted (compare
# syscalls per transaction with `perf stat -e 'syscalls:sys_enter_*'` for that).
#
#   scripts/instructions-per-txn.sh                       # -M extended, 16 clients, pool 4
#   PROTO=prepared TXNS=500 scripts/instructions-per-txn.sh
#   TARGETS=pgtenant PGTENANT=/path/to/other/build scripts/instructions-per-txn.sh
# shellcheck disable=SC2034,SC2012  # globals are read by bench-lib.sh; callgrind file names are plain
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-16}; TXNS=${TXNS:-300}; PROTO=${PROTO:-extended}; POOL_SIZE=${POOL_SIZE:-4}
TARGETS=${TARGETS:-"pgtenant pgbouncer"}
SCALE=1; PGPORT=${PGPORT:-55495}; BOUNCER_PORT=${BOUNCER_PORT:-56495}; PROXY_PORT=${PROXY_PORT:-57495}
. scripts/bench-lib.sh

command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
command -v pgbouncer >/dev/null || apt-get install -y -qq pgbouncer >/dev/null
if [ -z "${PGTENANT:-}" ]; then build_pgtenant; fi

BENCH_PID_VARS="TARGET_PID"
bench_workdir
start_postgres
create_bench_db
make_tls_cert
make_token

# pgbench -S against PORT with PASSWORD, TXNS transactions per client.
drive() {
    PGSSLMODE=require PGPASSWORD=$2 "$BIN/pgbench" -h 127.0.0.1 -p "$1" -U bench_app -S \
        -M "$PROTO" -c "$CLIENTS" -j 2 -t "$3" -n bench_db >"$WORK/pgbench.out" 2>&1
    grep -q '^number of failed transactions: 0' "$WORK/pgbench.out" \
        || { echo "pgbench failed:" >&2; cat "$WORK/pgbench.out" >&2; exit 1; }
}
# instructions PID PORT PASSWORD TXNS [as-user-cmd]: Ir of one pgbench run (counters zeroed first).
instructions() {
    local run_as=${5:-} file
    $run_as callgrind_control -z "$1" >/dev/null
    drive "$2" "$3" "$4"
    $run_as callgrind_control -d "$1" >/dev/null
    sleep 0.5
    file=$(ls -t "$WORK"/callgrind.out.* | head -1)
    awk '/^(summary|totals):/ {print $2; exit}' "$file"
}
# measure NAME PID PORT PASSWORD [as-user-cmd]
measure() {
    drive "$3" "$4" 20
    local short long
    short=$(instructions "$2" "$3" "$4" 100 "${5:-}")
    long=$(instructions "$2" "$3" "$4" $((100 + TXNS)) "${5:-}")
    printf '| %s | %s | %d |\n' "$1" "$PROTO" $(((long - short) / (CLIENTS * TXNS)))
}

echo "pgbench -S -M $PROTO, $CLIENTS clients, pool $POOL_SIZE, TLS; user-space instructions per transaction (callgrind, $(date -u +%Y-%m-%d))"
echo
echo "| target | protocol | instructions/txn |"
echo "|---|---|--:|"
for t in $TARGETS; do
    case $t in
        pgtenant)
            PGTENANT_TLS=require PGTENANT_POOL_MODE=transaction PGTENANT_POOL_SIZE=$POOL_SIZE \
                pgtenant_config "$PROXY_PORT" >"$WORK/pgtenant.toml"
            PGTENANT_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p" \
                "$PGTENANT" serve --config "$WORK/pgtenant.toml" 2>"$WORK/valgrind.log" &
            TARGET_PID=$!
            wait_port "$PROXY_PORT" 60 || { echo "pgtenant did not start" >&2; exit 1; }
            measure "pgtenant ($(git rev-parse --short HEAD 2>/dev/null || echo build))" "$TARGET_PID" "$PROXY_PORT" "$TOKEN"
            ;;
        pgbouncer)
            bouncer_userlist; BOUNCER_TLS=1; BOUNCER_POOL_SIZE=$POOL_SIZE; BOUNCER_MAX_CLIENTS=100
            start_bouncer transaction
            kill "$BOUNCER_PID"; sleep 1
            as_pg valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out.%p" \
                pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
            wait_port "$BOUNCER_PORT" 60 || { echo "PgBouncer did not start" >&2; exit 1; }
            TARGET_PID=$(pgrep -n -u postgres -f "callgrind.*pgbouncer")
            measure "PgBouncer $(bouncer_version)" "$TARGET_PID" "$BOUNCER_PORT" "$PASSWORD" as_pg
            ;;
        *) echo "unknown target '$t' (pgtenant, pgbouncer)" >&2; exit 2 ;;
    esac
    kill "$TARGET_PID" 2>/dev/null || true
    wait "$TARGET_PID" 2>/dev/null || true
    TARGET_PID=""
done
