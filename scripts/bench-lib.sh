# shellcheck shell=bash disable=SC2034,SC2153  # globals set here are read by the sourcing script
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
# tables can be appended. Optional: PGTENANT_TLS (listen.tls, default "disable") with
# TLS_CERT/TLS_KEY (see make_tls_cert), PGTENANT_POOL_SIZE (default 20) and
# PGTENANT_POOL_MODE (written as the upstream's pool_mode when set).
pgtenant_config() {
    cat <<TOML
[listen]
addr = "127.0.0.1:$1"
tls = "${PGTENANT_TLS:-disable}"
${TLS_CERT:+tls_cert = \"$TLS_CERT\"}
${TLS_KEY:+tls_key = \"$TLS_KEY\"}
[jwt]
secret_file = "$WORK/jwt.key"
[upstreams.bench]
kind = "dedicated"
url = "postgres://bench_app:$PASSWORD@127.0.0.1:$PGPORT/bench_db"
pool_size = ${PGTENANT_POOL_SIZE:-20}
${PGTENANT_POOL_MODE:+pool_mode = \"$PGTENANT_POOL_MODE\"}
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
    run_full "$pid" "$port" "$pw" "$proto" "$CLIENTS" "" "$@" | cut -d' ' -f1-5
}

# run_full PID PORT PASSWORD PROTOCOL CLIENTS LATLOG [extra pgbench args]
#   -> "tps lat_ms failed cpu_us_per_txn txns p50_ms p99_ms status"
# pgbench -S for $DURATION s. LATLOG non-empty: pgbench writes per-transaction logs with that
# prefix (-l) and p50/p99 come from them, else they are "–". RUN_SSLMODE sets PGSSLMODE
# (default "prefer"); PGBENCH_OUT names a file that gets pgbench's output. failed = pgbench's
# failed transactions + aborted clients; status is "ok", or "FAILED" when anything failed,
# pgbench exited non-zero or printed no TPS: such a run's TPS is not a result.
run_full() {
    local pid=$1 port=$2 pw=$3 proto=$4 clients=$5 latlog=$6; shift 6
    local before=0 after=0 threads=$((clients < 2 ? clients : 2)) rc=0 out
    local log_args=()
    [ -n "$latlog" ] && log_args=(-l "--log-prefix=$latlog")
    [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    out=$(PGSSLMODE=${RUN_SSLMODE:-prefer} PGPASSWORD=$pw "$BIN/pgbench" -h 127.0.0.1 -p "$port" \
        -U bench_app -S -M "$proto" -c "$clients" -j "$threads" -T "$DURATION" -n \
        "${log_args[@]}" "$@" bench_db 2>&1) || rc=$?
    [ -n "$pid" ] && { after=$(cpu_ticks "$pid") || after=$before; }
    if [ -n "${PGBENCH_OUT:-}" ]; then printf '%s\n' "$out" > "$PGBENCH_OUT"; fi
    local tps lat txns failed aborted errors
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\).*/\1/p' <<<"$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    aborted=$(grep -c 'aborted in command\|aborted while' <<<"$out" || true)
    errors=$(grep -c -i 'error\|fatal' <<<"$out" || true)
    failed=$(( ${failed:-$errors} + aborted ))
    local cpu="–"
    if [ -n "$pid" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        cpu=$(awk -v d=$((after - before)) -v t="$TICK" -v n="$txns" 'BEGIN{printf "%.1f", d/t*1e6/n}')
    fi
    local pct="– –"
    if [ -n "$latlog" ]; then
        pct=$(cat "$latlog".* 2>/dev/null | latency_percentiles)
        rm -f "$latlog".*
    fi
    local status=ok
    if [ "$rc" -ne 0 ] || [ "$failed" -gt 0 ] || [ -z "$tps" ]; then status=FAILED; fi
    echo "${tps:-0} ${lat:-–} $failed $cpu ${txns:-0} $pct $status"
}

# pgbench -l lines on stdin ("client txn latency_us script epoch us") -> "p50_ms p99_ms"
# (nearest rank; failed transactions, whose latency field is not a number, are skipped).
latency_percentiles() {
    awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n | awk '
        { a[NR] = $1 }
        function rank(p,  i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return a[i] }
        END { if (NR == 0) print "– –"; else printf "%.3f %.3f\n", rank(0.50) / 1000, rank(0.99) / 1000 }'
}

# A throwaway self-signed certificate for 127.0.0.1 (ECDSA P-256) in $WORK, readable by the
# postgres user (PgBouncer runs as it): sets TLS_CERT and TLS_KEY.
make_tls_cert() {
    TLS_CERT=$WORK/tls.crt TLS_KEY=$WORK/tls.key
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$TLS_KEY" -out "$TLS_CERT" >/dev/null 2>&1
    if [ "$(id -u)" = 0 ]; then chown postgres "$TLS_CERT" "$TLS_KEY"; fi
    chmod 600 "$TLS_KEY"
}

# wait_port PORT [SECONDS]: true once 127.0.0.1:PORT accepts TCP connections.
wait_port() {
    local i
    for i in $(seq $((${2:-10} * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# PgBouncer (apt) -----------------------------------------------------------------------------
# bouncer_userlist: $WORK/userlist.txt with bench_app's SCRAM secret (clients and server SCRAM).
bouncer_userlist() {
    local secret
    secret=$(psql_admin -c "SELECT rolpassword FROM pg_authid WHERE rolname='bench_app'")
    echo "\"bench_app\" \"$secret\"" > "$WORK/userlist.txt"
}

# PgBouncer's version ("1.18.0").
bouncer_version() { pgbouncer --version 2>/dev/null | awk 'NR==1{print $2}'; }

# True when the installed PgBouncer can run named prepared statements in transaction mode
# (max_prepared_statements, 1.21 and later).
bouncer_has_prepared() {
    local v major minor
    v=$(bouncer_version); major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
    [ "${major:-0}" -gt 1 ] || { [ "${major:-0}" -eq 1 ] && [ "${minor:-0}" -ge 21 ]; }
}

# start_bouncer MODE: PgBouncer on $BOUNCER_PORT in pool mode MODE, pid in BOUNCER_PID.
# BOUNCER_POOL_SIZE (default 20), BOUNCER_MAX_CLIENTS (default 500), BOUNCER_TLS=1 (client
# TLS required, with TLS_CERT/TLS_KEY), BOUNCER_EXTRA (more [pgbouncer] lines).
start_bouncer() {
    local tls=""
    if [ "${BOUNCER_TLS:-0}" = 1 ]; then
        tls="client_tls_sslmode = require
client_tls_cert_file = $TLS_CERT
client_tls_key_file = $TLS_KEY"
    fi
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
default_pool_size = ${BOUNCER_POOL_SIZE:-20}
max_client_conn = ${BOUNCER_MAX_CLIENTS:-500}
logfile = $WORK/pgbouncer.log
$tls
${BOUNCER_EXTRA:-}
INI
    if [ "$(id -u)" = 0 ]; then chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt; fi
    # runuser's PAM session resets the open-files limit: raise it again to the hard limit.
    # shellcheck disable=SC2016  # expanded by the inner shell
    as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec pgbouncer "$1"' sh "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
    wait_port "$BOUNCER_PORT" 10 || { echo "PgBouncer did not start:" >&2; tail -5 "$WORK/pgbouncer.log" >&2; return 1; }
    BOUNCER_PID=$(pgrep -n -x -f "pgbouncer $WORK/pgbouncer.ini")
}
stop_bouncer() {
    kill "$BOUNCER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$BOUNCER_PID" 2>/dev/null || break; sleep 0.1; done
    BOUNCER_PID=
}

# RSS of a process in KiB (VmRSS).
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Results: RESULTS[KEY] holds the run lines recorded for KEY, ';'-separated.
declare -A RESULTS
record() { RESULTS["$1"]+="$2;"; }
# results_col KEY N: field N of every run recorded for KEY, one per line.
results_col() { tr ';' '\n' <<<"${RESULTS["$1"]:-}" | awk -v n="$2" 'NF{print $n}'; }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{if(NR==0){print 0}else if(NR%2){print a[(NR+1)/2]}else{printf "%.1f", (a[NR/2]+a[NR/2+1])/2}}'; }
# median_fmt FORMAT: the median of the numbers on stdin, printed with FORMAT (printf).
median_fmt() {
    tr ' ' '\n' | sort -n | awk -v f="$1" '{a[NR]=$1} END{
        if (NR == 0) { print 0; exit }
        printf f "\n", (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2 }'
}
