#!/usr/bin/env bash
# Pooling benchmark (issue 5): pgtenant vs PgBouncer in transaction mode vs direct PostgreSQL,
# alternating targets within each repetition, TLS required by both proxies (a throwaway
# self-signed certificate), direct PostgreSQL without TLS as the reference. Starts a
# throwaway PostgreSQL, PgBouncer (apt) and pgtenant (release build); counts failed
# transactions (a failed run is marked, its TPS is not reported as a result); prints a
# Markdown table of TPS, latency, proxy CPU µs per transaction (utime+stime from /proc).
#
# Workloads (WORKLOADS, default all three):
#   select   pgbench -S, $CLIENTS clients (64), -M extended and -M prepared (PROTOCOLS)
#   connect  pgbench -C -S, $CONNECT_CLIENTS clients (8): pgtenant JWT vs PgBouncer SCRAM
#            (and direct SCRAM)
#   latency  pgbench -S -c 1 (-M $LATENCY_PROTOCOL): p50 and p99 from pgbench's
#            per-transaction log, added latency vs direct
#
#   scripts/bench-pooling.sh                          # 15 s runs, 2 repetitions
#   QUICK=1 scripts/bench-pooling.sh                  # smoke: 3 s runs, 1 repetition
#   PGTENANT_POOL_MODE=transaction scripts/bench-pooling.sh
#   DURATION=20 REPS=3 CLIENTS=64 SCALE=10 POOL_SIZE=20 WORKLOADS="select latency" ...
#   WARMUP=2: seconds of unrecorded pgbench per target before the first repetition
#
# POOL_SIZE is the server-connection budget (PgBouncer's default_pool_size, pgtenant's
# pool_size). pgtenant in session mode (the default until transaction pooling lands) pins a
# server connection per client, so it gets pool_size = max(POOL_SIZE, clients) and the table
# says so. PGTENANT_POOL_MODE=transaction writes `pool_mode = "transaction"` into pgtenant's
# upstream; a build without transaction pooling rejects that key and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then DURATION=${DURATION:-3}; REPS=${REPS:-1}; fi
DURATION=${DURATION:-15}
REPS=${REPS:-2}
CLIENTS=${CLIENTS:-64}
CONNECT_CLIENTS=${CONNECT_CLIENTS:-8}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
PROTOCOLS=${PROTOCOLS:-"extended prepared"}
LATENCY_PROTOCOL=${LATENCY_PROTOCOL:-extended}
WORKLOADS=${WORKLOADS:-"select connect latency"}
PGTENANT_POOL_MODE=${PGTENANT_POOL_MODE:-}
PGPORT=${PGPORT:-55436}; BOUNCER_PORT=${BOUNCER_PORT:-56436}; PROXY_PORT=${PROXY_PORT:-57436}
. scripts/bench-lib.sh

for w in $WORKLOADS; do
    case $w in select | connect | latency) ;; *) echo "unknown workload '$w' (select, connect, latency)" >&2; exit 2 ;; esac
done
command -v pgbouncer >/dev/null || apt-get install -y -qq pgbouncer >/dev/null
command -v openssl >/dev/null || apt-get install -y -qq openssl >/dev/null
build_pgtenant

BENCH_PID_VARS="PROXY_PID BOUNCER_PID"
bench_workdir
start_postgres
create_bench_db
make_tls_cert
make_token

# pgtenant: session mode needs one server connection per client.
mode=${PGTENANT_POOL_MODE:-session}
max_clients=0
for w in $WORKLOADS; do
    case $w in
        select) c=$CLIENTS ;;
        connect) c=$CONNECT_CLIENTS ;;
        *) c=1 ;;
    esac
    [ "$c" -gt "$max_clients" ] && max_clients=$c
done
PGTENANT_POOL_SIZE=$POOL_SIZE
NOTES=()
if [ "$mode" = session ] && [ "$max_clients" -gt "$POOL_SIZE" ]; then
    PGTENANT_POOL_SIZE=$max_clients
    NOTES+=("pgtenant runs in **session mode** (one server connection pinned per client): pool_size = $max_clients for it, PgBouncer transaction mode shares $POOL_SIZE. Set PGTENANT_POOL_MODE=transaction once transaction pooling has landed.")
fi
PGTENANT_TLS=require
pgtenant_config "$PROXY_PORT" > "$WORK/pgtenant.toml"
if ! RUST_BACKTRACE=0 "$PGTENANT" check-config --config "$WORK/pgtenant.toml" >"$WORK/check.log" 2>&1; then
    if grep -q 'unknown field .pool_mode.' "$WORK/check.log"; then
        echo "error: this pgtenant build ($(git rev-parse --short HEAD 2>/dev/null || echo '?')) does not know upstreams.X.pool_mode:" >&2
        echo "       transaction pooling has not landed here. Run without PGTENANT_POOL_MODE (session mode)" >&2
        echo "       or on a build that has it. pgtenant said:" >&2
    fi
    sed '/^Stack backtrace/,$d; s/^/       /' "$WORK/check.log" >&2
    exit 3
fi
start_pgtenant "$WORK/pgtenant.toml" "$WORK/pgtenant.log"
PROXY_PID=$STARTED_PID
wait_port "$PROXY_PORT" 20 || { echo "pgtenant did not start:" >&2; cat "$WORK/pgtenant.log" >&2; exit 1; }

# PgBouncer: transaction mode, SCRAM to clients (TLS required) and to PostgreSQL.
bouncer_userlist
BOUNCER_TLS=1
BOUNCER_POOL_SIZE=$POOL_SIZE
BOUNCER_MAX_CLIENTS=$((max_clients + 100))
BOUNCER_EXTRA=""
if bouncer_has_prepared; then
    BOUNCER_EXTRA="max_prepared_statements = 200"
else
    NOTES+=("PgBouncer $(bouncer_version) cannot run named prepared statements in transaction mode (1.21 added max_prepared_statements): its \`-M prepared\` rows are expected to fail.")
fi
start_bouncer transaction

TARGETS="direct pgbouncer pgtenant"
# target_args TARGET -> "pid port password sslmode"
target_args() {
    case $1 in
        direct) echo "- $PGPORT $PASSWORD disable" ;;
        pgbouncer) echo "$BOUNCER_PID $BOUNCER_PORT $PASSWORD require" ;;
        pgtenant) echo "$PROXY_PID $PROXY_PORT $TOKEN require" ;;
    esac
}
# measure KEY TARGET PROTOCOL CLIENTS LATLOG [pgbench args]: one run, recorded under KEY.
measure() {
    local key=$1 target=$2 proto=$3 clients=$4 latlog=$5; shift 5
    local pid port pw ssl line
    read -r pid port pw ssl <<<"$(target_args "$target")"
    [ "$pid" = - ] && pid=""
    line=$(RUN_SSLMODE=$ssl PGBENCH_OUT="$WORK/last.out" run_full "$pid" "$port" "$pw" "$proto" "$clients" "$latlog" "$@")
    record "$key" "$line"
    printf '  %-10s %-8s %-9s c=%-3s %s\n' "$target" "$proto" "${key%%|*}" "$clients" "$line" >&2
    if [[ $line == *FAILED ]]; then
        grep -m3 -i 'error\|abort\|fatal' "$WORK/last.out" | sed 's/^/      /' >&2 || true
        cp "$WORK/last.out" "$WORK/failed-$target-$proto.out"
    fi
}

# Warm-up (not recorded): every target's server connections open and caches fill before
# the first measured run, so whichever target runs first is not charged for it.
DURATION_SAVED=$DURATION; DURATION=${WARMUP:-2}
for t in $TARGETS; do
    measure "warmup|$t" "$t" extended "$max_clients" "" >/dev/null 2>&1 || true
done
DURATION=$DURATION_SAVED

declare -A CLIENTS_OF
echo "PostgreSQL $(psql_admin -c 'SHOW server_version' | cut -d' ' -f1), PgBouncer $(bouncer_version), pgtenant $mode mode; ${DURATION}s x $REPS; work dir $WORK" >&2
for rep in $(seq "$REPS"); do
    # Alternate the order per repetition so no target always runs on a warmer cache.
    order=$TARGETS
    [ $((rep % 2)) = 0 ] && order=$(tr ' ' '\n' <<<"$TARGETS" | tac | tr '\n' ' ')
    echo "repetition $rep/$REPS (order: $order)" >&2
    for w in $WORKLOADS; do
        case $w in
            select)
                for proto in $PROTOCOLS; do
                    for t in $order; do
                        CLIENTS_OF["select|$proto"]=$CLIENTS
                        measure "select|$proto|$t" "$t" "$proto" "$CLIENTS" ""
                    done
                done ;;
            connect)
                for t in $order; do
                    CLIENTS_OF["connect|simple"]=$CONNECT_CLIENTS
                    measure "connect|simple|$t" "$t" simple "$CONNECT_CLIENTS" "" -C
                done ;;
            latency)
                for t in $order; do
                    CLIENTS_OF["latency|$LATENCY_PROTOCOL"]=1
                    measure "latency|$LATENCY_PROTOCOL|$t" "$t" "$LATENCY_PROTOCOL" 1 "$WORK/lat-$t"
                done ;;
        esac
    done
done

# --- Report ------------------------------------------------------------------------------
label() {
    case $1 in
        direct) echo "direct (no TLS, SCRAM)" ;;
        pgbouncer) echo "PgBouncer $(bouncer_version) transaction (TLS, SCRAM)" ;;
        pgtenant) echo "pgtenant $mode (TLS, JWT)" ;;
    esac
}
workload_label() {
    case $1 in
        select) echo "select-only \`-S\`" ;;
        connect) echo "connect per txn \`-C -S\`" ;;
        latency) echo "latency \`-S -c 1\`" ;;
    esac
}
fmt_int() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }

# summary KEY -> "tps lat p50 p99 cpu failed nfailed_runs" (medians over runs; failed summed)
summary() {
    local key=$1 tps lat p50 p99 cpu failed bad
    tps=$(results_col "$key" 1 | median | awk '{printf "%.0f", $1}')
    lat=$(results_col "$key" 2 | awk '$1!="–"' | median_fmt %.3f)
    p50=$(results_col "$key" 6 | awk '$1!="–"' | median_fmt %.3f)
    p99=$(results_col "$key" 7 | awk '$1!="–"' | median_fmt %.3f)
    cpu=$(results_col "$key" 4 | awk '$1!="–"' | median_fmt %.1f)
    failed=$(results_col "$key" 3 | awk '{s+=$1} END{print s+0}')
    bad=$(results_col "$key" 8 | grep -c FAILED || true)
    echo "$tps $lat $p50 $p99 $cpu $failed $bad"
}
dash0() { if [ "$1" = 0 ] || [ "$1" = "0.0" ]; then echo "–"; else echo "$1"; fi; }

echo
echo "pgbench, scale $SCALE, ${DURATION}s x $REPS (medians), server budget $POOL_SIZE, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "PostgreSQL $(psql_admin -c 'SHOW server_version' | cut -d' ' -f1) ($PG_SETTINGS), PgBouncer $(bouncer_version); TLS: ECDSA P-256 self-signed, pgbench sslmode=require to both proxies; direct PostgreSQL without TLS"
echo
echo "| target | workload | clients | protocol | TPS (median) | vs PgBouncer | latency avg ms | p50 ms | p99 ms | proxy CPU µs/txn | failed |"
echo "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"
declare -A P50 P99
for w in $WORKLOADS; do
    protos=$PROTOCOLS
    [ "$w" = connect ] && protos=simple
    [ "$w" = latency ] && protos=$LATENCY_PROTOCOL
    for proto in $protos; do
        read -r b_tps _ _ _ _ _ b_bad <<<"$(summary "$w|$proto|pgbouncer")"
        for t in $TARGETS; do
            key="$w|$proto|$t"
            [ -z "${RESULTS["$key"]:-}" ] && continue
            read -r tps lat p50 p99 cpu failed bad <<<"$(summary "$key")"
            P50[$key]=$p50; P99[$key]=$p99
            ratio="–"
            if [ "$t" != pgbouncer ] && [ "$bad" = 0 ] && [ "$b_bad" = 0 ]; then
                ratio=$(awk -v a="$tps" -v b="$b_tps" 'BEGIN{if(b>0) printf "%.2f", a/b; else print "–"}')
            fi
            tps_cell=$(fmt_int "$tps")
            if [ "$bad" != 0 ]; then tps_cell="**FAILED** ($bad of $REPS runs; $tps_cell incomplete)"; fi
            [ "$t" = direct ] && cpu="–"
            [ "$w" != latency ] && { p50="–"; p99="–"; }
            echo "| $(label "$t") | $(workload_label "$w") | ${CLIENTS_OF["$w|$proto"]} | $proto | $tps_cell | $ratio | $lat | $p50 | $p99 | $(dash0 "$cpu") | $failed |"
        done
    done
done
if [[ " $WORKLOADS " == *" latency "* ]]; then
    echo
    echo "Added latency at 1 client vs direct (p50 / p99, ms; proxies with TLS, direct without):"
    d="latency|$LATENCY_PROTOCOL|direct"
    for t in pgbouncer pgtenant; do
        k="latency|$LATENCY_PROTOCOL|$t"
        awk -v n="$(label "$t")" -v a="${P50[$k]:-}" -v b="${P99[$k]:-}" -v da="${P50[$d]:-}" -v db="${P99[$d]:-}" \
            'BEGIN{ if (a=="" || da=="" || a=="–" || da=="–") { printf "- %s: –\n", n } else printf "- %s: +%.3f / +%.3f\n", n, a-da, b-db }'
    done
fi
NOTES+=("failed = pgbench's failed transactions plus aborted clients, summed over runs; a row with a failed run shows **FAILED** instead of a TPS. CPU = the proxy process's utime+stime over the run / transactions.")
echo
for n in "${NOTES[@]}"; do echo "- $n"; done
