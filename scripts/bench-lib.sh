# shellcheck shell=bash disable=SC2034  # globals set here are read by the sourcing script
# Shared by scripts/bench.sh and scripts/bench-audit.sh (sourced after `cd` to the repository
# root and after DURATION, CLIENTS and PGPORT are set): a throwaway PostgreSQL (run as the
# postgres user when root), the pgtenant release build and its base config, pgbench runs and
# their parsing, proxy CPU from /proc, medians, and cleanup at exit.

BIN=$(pg_config --bindir)
TICK=$(getconf CLK_TCK)

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

build_pgtenant() {
    cargo build --release --quiet
    PGTENANT=$PWD/target/release/pgtenant
}

# Names of the variables holding the pids bench_cleanup stops (read at exit, so a pid may
# change or be cleared while the script runs).
BENCH_PID_VARS=""

# Creates $WORK (readable by the postgres user) and stops everything there at exit.
bench_workdir() {
    WORK=$(mktemp -d /tmp/pgtenant-bench.XXXXXX)
    chmod 755 "$WORK"
    if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"; fi
    trap bench_cleanup EXIT
}

bench_cleanup() {
    local v pid pids=()
    for v in $BENCH_PID_VARS; do
        pid=${!v:-}
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    # Give them a moment to exit (an audit spool is flushed on SIGTERM), then insist.
    for pid in "${pids[@]}"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    as_pg "$BIN/pg_ctl" -D "$WORK/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}

# PostgreSQL on $PGPORT (TCP on 127.0.0.1 with SCRAM, Unix socket in $WORK with trust), tuned
# for benchmarking rather than durability.
start_postgres() {
    as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w \
        -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off" start >/dev/null
}
PG_SETTINGS="fsync=off, synchronous_commit=off, shared_buffers=256MB"
psql_admin() { as_pg "$BIN/psql" -h "$WORK" -p "$PGPORT" -U postgres -qAt "$@"; }

# Role bench_app with password $PASSWORD owning bench_db, filled by pgbench -i at scale $SCALE.
create_bench_db() {
    PASSWORD=benchpw$RANDOM$RANDOM
    psql_admin -c "CREATE ROLE bench_app LOGIN PASSWORD '$PASSWORD'" -c "CREATE DATABASE bench_db OWNER bench_app"
    PGPASSWORD=$PASSWORD "$BIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U bench_app -i -s "$SCALE" -q bench_db >/dev/null 2>&1
}

# A JWT key in $WORK/jwt.key; TOKEN is for tenant "bench" (call after build_pgtenant).
make_token() {
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/jwt.key"
    TOKEN=$("$PGTENANT" token --secret-file "$WORK/jwt.key" --tenant bench --sub bench --ttl 86400)
}

# pgtenant_config PORT: a config listening on PORT, tenant "bench" routed to its dedicated
# database (WORKERS sets runtime.worker_threads). The [runtime] table comes last, so more
# tables can be appended.
pgtenant_config() {
    cat <<TOML
[listen]
addr = "127.0.0.1:$1"
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
}

# start_pgtenant CONFIG LOG: starts `pgtenant serve` in the background; its pid in STARTED_PID.
start_pgtenant() {
    PGTENANT_LOG=warn "$PGTENANT" serve --config "$1" 2>"$2" &
    STARTED_PID=$!
}

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# run PID PORT PASSWORD PROTOCOL [extra pgbench args]
#   -> "tps lat_ms failed cpu_us_per_txn txns" (PID empty: no CPU accounting)
run() {
    local pid=$1 port=$2 pw=$3 proto=$4; shift 4
    local before=0 after=0
    [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    local out
    out=$(PGPASSWORD=$pw "$BIN/pgbench" -h 127.0.0.1 -p "$port" -U bench_app -S -M "$proto" \
        -c "$CLIENTS" -j 2 -T "$DURATION" -n "$@" bench_db 2>&1 || true)
    [ -n "$pid" ] && after=$(cpu_ticks "$pid")
    local tps lat txns failed errors
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\).*/\1/p' <<<"$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    errors=$(grep -c -i 'error\|fatal' <<<"$out" || true)
    local cpu="–"
    if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        cpu=$(awk -v d=$((after - before)) -v t="$TICK" -v n="$txns" 'BEGIN{printf "%.1f", d/t*1e6/n}')
    fi
    echo "${tps:-0} ${lat:-–} ${failed:-$errors} $cpu ${txns:-0}"
}

# Results: RESULTS[KEY] holds the run lines recorded for KEY, ';'-separated.
declare -A RESULTS
record() { RESULTS["$1"]+="$2;"; }
# results_col KEY N: field N of every run recorded for KEY, one per line.
results_col() { tr ';' '\n' <<<"${RESULTS["$1"]:-}" | awk -v n="$2" 'NF{print $n}'; }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{if(NR==0){print 0}else if(NR%2){print a[(NR+1)/2]}else{printf "%.1f", (a[NR/2]+a[NR/2+1])/2}}'; }
