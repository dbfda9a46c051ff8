//! The SQL guard's cost per statement: the prefilter's fast path, a full parse and walk
//! (uncached), a cache hit, a 5-statement string, and a blocked statement.
//!
//! `cargo bench --bench guard`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pgtenant::isolation::guard::{CacheLimits, Guard, GuardConfig};

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
const FIVE: &str = "BEGIN; \
    UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7; \
    SELECT abalance FROM pgbench_accounts WHERE aid = 7; \
    INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 7, 1, CURRENT_TIMESTAMP); \
    END";
const BLOCKED: &str = "SELECT set_config('app.current_tenant_id', 'other', false)";
const BACKSLASH: &str = "UPDATE t SET p = replace(p, '\\', '/') WHERE id = $1";

fn bench(c: &mut Criterion) {
    let cached = Guard::new(GuardConfig::default());
    let no_cache = Guard::with_cache_limits(
        GuardConfig::default(),
        CacheLimits {
            max_entries: 0,
            ..CacheLimits::default()
        },
    );
    for sql in [SELECT, UPDATE, FIVE, BACKSLASH] {
        assert!(cached.check(sql).is_ok(), "{sql}");
    }
    assert!(cached.check(BLOCKED).is_err());

    let mut g = c.benchmark_group("guard");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("select_prefiltered", |b| {
        b.iter(|| no_cache.check(black_box(SELECT)))
    });
    g.bench_function("select_uncached_parse", |b| {
        b.iter(|| no_cache.check_uncached(black_box(SELECT)))
    });
    g.bench_function("update_uncached_parse", |b| {
        b.iter(|| no_cache.check(black_box(UPDATE)))
    });
    g.bench_function("update_cached", |b| {
        b.iter(|| cached.check(black_box(UPDATE)))
    });
    g.bench_function("five_statements_uncached", |b| {
        b.iter(|| no_cache.check(black_box(FIVE)))
    });
    g.bench_function("five_statements_cached", |b| {
        b.iter(|| cached.check(black_box(FIVE)))
    });
    g.bench_function("blocked_uncached", |b| {
        b.iter(|| no_cache.check(black_box(BLOCKED)))
    });
    g.bench_function("blocked_cached", |b| {
        b.iter(|| cached.check(black_box(BLOCKED)))
    });
    g.bench_function("backslash_two_parses_uncached", |b| {
        b.iter(|| no_cache.check(black_box(BACKSLASH)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
