#!/usr/bin/env bash
# Audit overhead benchmark: pgbench select-only through two pgtenant processes in one run,
# alternating: one without [audit], one with `[audit] level = "statement"` (spool in the work
# dir, fsync = "batch", on_full = "fail_open" so a slow audit never blocks a run; drops are
# reported). Goal: at most 10% throughput loss, and shipping keeps up (the oldest unshipped
# event's age stays bounded) at the proxy's full statement rate.
#
# One throwaway PostgreSQL holds both bench_db and the audit database (made by
# `pgtenant audit init`). During and after each audited run the audited proxy's /metrics is
# sampled every second; after the run the script waits (at most 120 s) until every spooled
# event is in the audit table. At the end the audit table's statement events are checked
# against the transactions pgbench reported.
#
#   scripts/bench-audit.sh           # defaults: 15 s runs, 8 clients, 2 repetitions, scale 10
#   DURATION=20 CLIENTS=8 REPS=3 SCALE=10 PROTOCOLS="simple prepared" scripts/bench-audit.sh
#   WORKERS=1 scripts/bench-audit.sh # both proxies with one tokio worker thread
#   AUDIT_FSYNC=off scripts/bench-audit.sh  # spool without fsync (still survives kill -9)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-8}
REPS=${REPS:-2}
SCALE=${SCALE:-10}
PROTOCOLS=${PROTOCOLS:-"simple extended prepared"}
PGPORT=${PGPORT:-55434}
OFF_PORT=${OFF_PORT:-57434}; OFF_ADMIN_PORT=${OFF_ADMIN_PORT:-59434}
ON_PORT=${ON_PORT:-57435}; ON_ADMIN_PORT=${ON_ADMIN_PORT:-59435}
DRAIN_CAP=120
AUDIT_DB=pgtenant_audit
AUDIT_TABLE=audit_tenant_access
. scripts/bench-lib.sh

# GET http://127.0.0.1:PORT/PATH, body only (curl, or bash's /dev/tcp without it).
http_get() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 2 "http://127.0.0.1:$1$2"
    else
        local fd
        exec {fd}<>"/dev/tcp/127.0.0.1/$1" || return 1
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&"$fd"
        timeout 2 cat <&"$fd" | tr -d '\r' | sed '1,/^$/d'
        exec {fd}<&-
    fi
}

# audit_metrics -> "spooled written spool_events oldest_unshipped_s dropped" (sums over sinks
# and reasons; the age is the maximum over sinks; a metric not yet reported counts as 0).
audit_metrics() {
    local body
    body=$(http_get "$ON_ADMIN_PORT" /metrics) || return 1
    awk '
        { name = $1; sub(/\{.*/, "", name) }
        name == "pgtenant_audit_events_spooled_total"    { sp += $NF }
        name == "pgtenant_audit_events_written_total"    { wr += $NF }
        name == "pgtenant_audit_spool_events"            { ev += $NF }
        name == "pgtenant_audit_oldest_unshipped_seconds" { if ($NF > age) age = $NF }
        name == "pgtenant_audit_events_dropped_total"    { dr += $NF }
        END { printf "%d %d %d %.3f %d\n", sp, wr, ev, age, dr }' <<<"$body"
}

# Background: one "oldest_unshipped_s spool_events" line per second until killed.
# CPU ticks of the audit database's backends serving pgtenant's writer role (0 if none yet).
audit_backend_ticks() {
    local pid total=0
    for pid in $(psql_admin -d "$AUDIT_DB" -c "SELECT pid FROM pg_stat_activity WHERE usename = 'pgtenant_audit'"); do
        [ -r "/proc/$pid/stat" ] && total=$((total + $(cpu_ticks "$pid")))
    done
    echo "$total"
}

sample_loop() {
    local m
    while :; do
        if m=$(audit_metrics 2>/dev/null); then
            awk '{print $4, $3}' <<<"$m"
        fi
        sleep 1
    done
}

build_pgtenant
BENCH_PID_VARS="SAMPLER_PID ON_PID OFF_PID"
bench_workdir
start_postgres
create_bench_db

# Two proxies, same upstream and tenant; the second one audits every statement.
make_token
AUDIT_PASSWORD=auditpw$RANDOM$RANDOM$RANDOM
pgtenant_config "$OFF_PORT" > "$WORK/pgtenant-off.toml"
cat >> "$WORK/pgtenant-off.toml" <<TOML
[admin]
addr = "127.0.0.1:$OFF_ADMIN_PORT"
TOML
pgtenant_config "$ON_PORT" > "$WORK/pgtenant-on.toml"
cat >> "$WORK/pgtenant-on.toml" <<TOML
[admin]
addr = "127.0.0.1:$ON_ADMIN_PORT"
[audit]
url = "postgres://pgtenant_audit:$AUDIT_PASSWORD@127.0.0.1:$PGPORT/$AUDIT_DB"
table = "$AUDIT_TABLE"
level = "statement"
spool_dir = "$WORK/spool"
fsync = "${AUDIT_FSYNC:-batch}"
on_full = "fail_open"
TOML
if ! "$PGTENANT" audit init --config "$WORK/pgtenant-on.toml" \
    --admin-url "host=$WORK port=$PGPORT user=postgres dbname=postgres" >"$WORK/audit-init.log" 2>&1; then
    cat "$WORK/audit-init.log" >&2
    exit 1
fi

start_pgtenant "$WORK/pgtenant-off.toml" "$WORK/pgtenant-off.log"
OFF_PID=$STARTED_PID
start_pgtenant "$WORK/pgtenant-on.toml" "$WORK/pgtenant-on.log"
ON_PID=$STARTED_PID
for port in "$OFF_ADMIN_PORT" "$ON_ADMIN_PORT"; do
    for i in $(seq 100); do
        http_get "$port" /readyz >/dev/null 2>&1 && break
        if [ "$i" = 100 ]; then
            echo "pgtenant (admin port $port) did not become ready:" >&2
            cat "$WORK"/pgtenant-*.log >&2
            exit 1
        fi
        sleep 0.1
    done
done

STATEMENTS_EXPECTED=0 # transactions pgbench reported for the audited runs so far

# run_audited PROTOCOL: RUN_LINE = the run line plus " max_oldest_s max_spool_events drain_s",
# with the CPU the proxy spends shipping the run's events after it (the drain) added to its
# µs/txn. Not in a subshell: it keeps STATEMENTS_EXPECTED and SAMPLER_PID.
run_audited() {
    local proto=$1 r txns m start ticks0 ticks1 elapsed ok_at="" drain db0 db1
    : > "$WORK/samples"
    sample_loop >> "$WORK/samples" &
    SAMPLER_PID=$!
    db0=$(audit_backend_ticks)
    r=$(run "$ON_PID" "$ON_PORT" "$TOKEN" "$proto")
    start=$EPOCHREALTIME
    ticks0=$(cpu_ticks "$ON_PID")
    txns=$(awk '{print $5}' <<<"$r")
    STATEMENTS_EXPECTED=$((STATEMENTS_EXPECTED + txns))
    # Drained: everything spooled is written, nothing is left in the spool, and at least as many
    # events were spooled as pgbench reported audited transactions so far; seen twice in a row,
    # 0.2 s apart (so events still on their way to the spool count). Timed from pgbench's end.
    while :; do
        m=$(audit_metrics 2>/dev/null || echo "0 0 1 0 0")
        elapsed=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
        if awk -v e="$STATEMENTS_EXPECTED" '{exit !($2 >= $1 && $3 == 0 && $1 >= e)}' <<<"$m"; then
            [ -n "$ok_at" ] && break
            ok_at=$elapsed
        else
            ok_at=""
        fi
        if awk -v e="$elapsed" -v c="$DRAIN_CAP" 'BEGIN{exit !(e >= c)}'; then
            ok_at=">$DRAIN_CAP"
            break
        fi
        sleep 0.2
    done
    drain=$ok_at
    ticks1=$(cpu_ticks "$ON_PID")
    db1=$(audit_backend_ticks)
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    local max
    max=$(awk 'NF==2{if($1>a)a=$1; if($2>e)e=$2} END{printf "%.1f %d", a, e}' "$WORK/samples")
    RUN_LINE=$(awk -v d=$((ticks1 - ticks0)) -v db=$((db1 - db0)) -v t="$TICK" -v max="$max" -v drain="$drain" '{
        dbus = ($5 > 0) ? sprintf("%.1f", db/t*1e6/$5) : "–"
        if ($4 != "–" && $5 > 0) $4 = sprintf("%.1f", $4 + d/t*1e6/$5)
        print $0, max, drain, dbus }' <<<"$r")
}

for _ in $(seq "$REPS"); do
    for proto in $PROTOCOLS; do
        record "off|$proto" "$(run "$OFF_PID" "$OFF_PORT" "$TOKEN" "$proto")"
        run_audited "$proto"
        record "statement|$proto" "$RUN_LINE"
    done
done

# The audit table against pgbench: one statement per -S transaction (a -M prepared Parse is
# not an execution). pgbench also runs two setup queries per run on a connection of its own
# (the scale from pgbench_branches and a partitioning check on pg_catalog), which are audited
# too; they are counted separately.
read -r STMT_TOTAL STMT_BENCH < <(psql_admin -d "$AUDIT_DB" -F ' ' -c "
    SELECT count(*), count(*) FILTER (WHERE EXISTS (
        SELECT FROM unnest(tables) AS t WHERE t = 'pgbench_accounts' OR t LIKE '%.pgbench_accounts'))
    FROM $AUDIT_TABLE WHERE event = 'statement'")
read -r SPOOLED WRITTEN _ _ DROPPED < <(audit_metrics)
[ "$STMT_BENCH" = "$STATEMENTS_EXPECTED" ] && VERDICT=match || VERDICT=MISMATCH

echo
echo "pgbench -S, scale $SCALE, $CLIENTS clients, ${DURATION}s x $REPS, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "audit: level = \"statement\", fsync = \"${AUDIT_FSYNC:-batch}\", on_full = \"fail_open\", spool on $(stat -f -c %T "$WORK"), ship to the same PostgreSQL ($PG_SETTINGS)"
echo "The audit database shares the PostgreSQL cluster and the $(nproc) cores with bench_db, both proxies and pgbench."
echo
echo "| protocol | audit | TPS (median) | latency ms | failed | proxy CPU µs/txn | audit DB CPU µs/txn | TPS vs audit off | max oldest unshipped s | max spool events | drain s |"
echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
for proto in $PROTOCOLS; do
    off_tps=$(results_col "off|$proto" 1 | median)
    for audit in off statement; do
        key="$audit|$proto"
        tps=$(results_col "$key" 1 | median | awk '{printf "%.0f", $1}')
        lat=$(results_col "$key" 2 | median)
        failed=$(results_col "$key" 3 | awk '{s+=$1} END{print s+0}')
        cpu=$(results_col "$key" 4 | awk '$1!="–"' | median)
        ratio=$(awk -v a="$tps" -v b="$off_tps" 'BEGIN{if(b>0) printf "%.2f", a/b; else print "–"}')
        if [ "$audit" = off ]; then
            age="–" events="–" drain="–" dbcpu="–"
        else
            dbcpu=$(results_col "$key" 9 | awk '$1!="–"' | median)
            age=$(results_col "$key" 6 | awk '$1 > m {m = $1} END {printf "%.1f", m}')
            events=$(results_col "$key" 7 | awk '$1 > m {m = $1} END {print m + 0}')
            drain=$(results_col "$key" 8 | awk -v cap=">$DRAIN_CAP" '
                /^>/ {over = 1} $1 + 0 > m {m = $1 + 0} END {if (over) print cap; else printf "%.1f", m}')
        fi
        echo "| $proto | $audit | $tps | $lat | $failed | $cpu | $dbcpu | $ratio | $age | $events | $drain |"
    done
done
echo
echo "Audited columns: worst run of $REPS; the metrics are sampled every second during the run and its drain."
echo "Proxy CPU of the audited proxy includes shipping after the run (drain); audit DB CPU is the PostgreSQL backend(s) of pgtenant's audit writer, per transaction."
echo "Audit table: $STMT_BENCH pgbench statement events vs $STATEMENTS_EXPECTED transactions pgbench reported: $VERDICT" \
    "($STMT_TOTAL statement events in all, $((STMT_TOTAL - STMT_BENCH)) of them pgbench's setup queries)"
echo "Audit events: $SPOOLED spooled, $WRITTEN written, $DROPPED dropped"
