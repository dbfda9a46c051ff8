//! The guard's corpus: the escapes observed in `design/isolation.md` (and the ones found
//! while building the guard, each reproduced on PostgreSQL 15) and statements that must
//! pass. A false positive is a bug like a miss.

use super::*;
use Rule::*;

/// Blocked with the default config: (text, rule, statement index).
const BLOCKED: &[(&str, Rule, usize)] = &[
    // SET / RESET of the tenant setting, every spelling.
    ("set app.current_tenant_id = 'x'", TenantSetting, 0),
    ("SET app.current_tenant_id TO 'x'", TenantSetting, 0),
    ("SET SESSION \"app\".\"current_tenant_id\" TO 'x'", TenantSetting, 0),
    ("SET LOCAL app.CURRENT_TENANT_ID = 'x'", TenantSetting, 0),
    ("SET /* c */ app . current_tenant_id = 'x'", TenantSetting, 0),
    ("SET\n-- c\napp.current_tenant_id\n=\n'x'", TenantSetting, 0),
    ("SET \"APP\".\"Current_Tenant_Id\" = 'x'", TenantSetting, 0),
    ("SET \"app.current_tenant_id\" = 'x'", TenantSetting, 0),
    ("SET U&\"app\".U&\"current_\\0074enant_id\" = 'x'", TenantSetting, 0),
    ("SET u&\"\\0061pp\".U&\"current\\005ftenant\\005fid\" = 'x'", TenantSetting, 0),
    ("SET U&\"a!0070p\" UESCAPE '!'.current_tenant_id = 'x'", TenantSetting, 0),
    ("SET app.current_tenant_id = E'\\x41'", TenantSetting, 0),
    ("SET app.current_tenant_id = $$x$$", TenantSetting, 0),
    ("SET app.current_tenant_id = $t$x$t$", TenantSetting, 0),
    ("SET app.current_tenant_id = U&'\\0041'", TenantSetting, 0),
    ("SET app.current_tenant_id = x", TenantSetting, 0),
    ("SET app.current_tenant_id = 42", TenantSetting, 0),
    ("SET app.current_tenant_id TO DEFAULT", TenantSetting, 0),
    ("RESET app.current_tenant_id", TenantSetting, 0),
    ("reset \"app\".current_tenant_id", TenantSetting, 0),
    ("ALTER DATABASE postgres SET app.current_tenant_id = 'x'", TenantSetting, 0),
    ("ALTER FUNCTION f() SET app.current_tenant_id = 'x'", TenantSetting, 0),
    ("ALTER SYSTEM SET app.current_tenant_id = 'x'", TenantSetting, 0),
    ("SELECT 1; SET app.current_tenant_id='x'", TenantSetting, 1),
    ("BEGIN; SELECT 1; SET LOCAL app.current_tenant_id = 'x'; COMMIT", TenantSetting, 2),
    ("SET app.current_tenant_id = 'x'\0", TenantSetting, 0),
    // RESET ALL, DISCARD.
    ("RESET ALL", ResetAll, 0),
    ("reset all;", ResetAll, 0),
    ("DISCARD ALL", Discard, 0),
    ("DISCARD PLANS", Discard, 0),
    ("discard temp", Discard, 0),
    ("DISCARD SEQUENCES", Discard, 0),
    // set_config, anywhere, any spelling.
    ("SELECT set_config('app.current_tenant_id','x',false)", SetConfig, 0),
    ("select PG_CATALOG.SET_CONFIG('app.current_tenant_id','x',false)", SetConfig, 0),
    ("SELECT \"set_config\"('app.current_tenant_id','x',false)", SetConfig, 0),
    ("SELECT pg_catalog.\"set_config\"('a','x',false)", SetConfig, 0),
    ("SELECT U&\"\\0073et_config\"('app.current_tenant_id','x',false)", SetConfig, 0),
    ("SELECT /* set_config */ set_config('a','b',false)", SetConfig, 0),
    ("SELECT set_config(lower('APP.current_tenant_id'), 'x', false)", SetConfig, 0),
    ("SELECT set_config('app.' || 'current_tenant_id', chr(120), false)", SetConfig, 0),
    ("SELECT set_config($1, $2, false)", SetConfig, 0),
    ("WITH c AS (SELECT set_config('app.current_tenant_id','x',false)) SELECT * FROM c", SetConfig, 0),
    ("SELECT * FROM t WHERE set_config('app.current_tenant_id','x',false) IS NOT NULL", SetConfig, 0),
    ("SELECT * FROM (SELECT set_config('app.current_tenant_id','x',false)) s", SetConfig, 0),
    ("SELECT length(set_config('app.current_tenant_id','x',false))", SetConfig, 0),
    ("SELECT CASE WHEN true THEN set_config('a','b',false) END", SetConfig, 0),
    ("SELECT 1 LIMIT (SELECT length(set_config('a','b',false)))", SetConfig, 0),
    ("VALUES (set_config('a','b',false))", SetConfig, 0),
    ("SELECT * FROM set_config('a','b',false)", SetConfig, 0),
    ("SELECT 1 FROM t ORDER BY set_config('a','b',false)", SetConfig, 0),
    ("SELECT count(*) FILTER (WHERE set_config('a','b',false) IS NULL) FROM t", SetConfig, 0),
    ("SELECT count(*) OVER (PARTITION BY set_config('a','b',false)) FROM t", SetConfig, 0),
    ("PREPARE p AS SELECT set_config('app.current_tenant_id','x',false)", SetConfig, 0),
    ("CREATE VIEW v AS SELECT set_config('app.current_tenant_id','x',false)", SetConfig, 0),
    ("EXPLAIN ANALYZE SELECT set_config('a','b',false)", SetConfig, 0),
    ("DECLARE c CURSOR FOR SELECT set_config('a','b',false)", SetConfig, 0),
    ("COPY (SELECT set_config('a','b',false)) TO STDOUT", SetConfig, 0),
    ("INSERT INTO t VALUES (set_config('a','b',false))", SetConfig, 0),
    ("UPDATE t SET v = set_config('a','b',false)", SetConfig, 0),
    ("CREATE TABLE t2 (c text DEFAULT set_config('a','b',false))", SetConfig, 0),
    ("CREATE POLICY p ON t USING (set_config('a','b',false) IS NOT NULL)", SetConfig, 0),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD SELECT set_config('a','b',false)", SetConfig, 0),
    ("CALL set_config('a','b',false)", SetConfig, 0),
    // set_config bound to an aggregate, by name or by (escaped) string: ran on PG 15.
    ("CREATE AGGREGATE evil(text, bool) (sfunc = set_config, stype = text, initcond = 'app.current_tenant_id')", SetConfig, 0),
    ("CREATE AGGREGATE evil(text, bool) (sfunc = pg_catalog.set_config, stype = text)", SetConfig, 0),
    ("CREATE AGGREGATE evil(text, bool) (sfunc = E'\\163et_config', stype = text)", SetConfig, 0),
    ("GRANT EXECUTE ON FUNCTION set_config(text, text, boolean) TO public", SetConfig, 0),
    // pg_settings' update rule calls set_config.
    ("UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'", SetConfig, 0),
    ("update PG_CATALOG.PG_SETTINGS set setting = 'x'", SetConfig, 0),
    ("WITH u AS (UPDATE pg_settings SET setting = 'x' RETURNING 1) SELECT * FROM u", SetConfig, 0),
    ("INSERT INTO pg_settings (name, setting) VALUES ('a', 'b')", SetConfig, 0),
    ("CREATE VIEW s AS SELECT * FROM pg_settings", SetConfig, 0),
    // standard_conforming_strings smuggling: with it off (on the server), the quote after
    // `\` does not end the first string, so the server runs set_config; read with it on,
    // the call is inside a string. Ran on PG 15. Caught by the second parse.
    ("SELECT '\\' AS x, ' AS y, set_config($a$app.current_tenant_id$a$, $a$b$a$, false) --'", SetConfig, 0),
    // Role and session authorization.
    ("SET ROLE other", SetRole, 0),
    ("set role none", SetRole, 0),
    ("SET SESSION ROLE other", SetRole, 0),
    ("SET LOCAL ROLE other", SetRole, 0),
    ("SET \"role\" = 'other'", SetRole, 0),
    ("SET role TO DEFAULT", SetRole, 0),
    ("RESET ROLE", SetRole, 0),
    ("ALTER FUNCTION f() SET role = 'other'", SetRole, 0),
    ("SET SESSION AUTHORIZATION x", SessionAuthorization, 0),
    ("SET SESSION AUTHORIZATION DEFAULT", SessionAuthorization, 0),
    ("RESET SESSION AUTHORIZATION", SessionAuthorization, 0),
    ("SET session_authorization = 'x'", SessionAuthorization, 0),
    // ALTER ROLE / USER / GROUP.
    ("ALTER ROLE pgtenant SET search_path = evil", AlterRole, 0),
    ("ALTER USER CURRENT_USER PASSWORD 'x'", AlterRole, 0),
    ("ALTER ROLE pgtenant PASSWORD 'x'", AlterRole, 0),
    ("ALTER ROLE ALL SET statement_timeout = 1", AlterRole, 0),
    ("ALTER USER pgtenant IN DATABASE d SET default_transaction_read_only = on", AlterRole, 0),
    ("ALTER ROLE pgtenant RESET ALL", AlterRole, 0),
    ("ALTER ROLE pgtenant SET app.current_tenant_id = 'x'", AlterRole, 0),
    ("ALTER ROLE a RENAME TO b", AlterRole, 0),
    ("ALTER GROUP g ADD USER u", AlterRole, 0),
    // Configurable, on by default.
    ("DO $$ BEGIN PERFORM set_config('app.current_tenant_id','x',false); END $$", DoBlock, 0),
    ("DO LANGUAGE plpgsql $$ BEGIN NULL; END $$", DoBlock, 0),
    ("do 'begin null; end'", DoBlock, 0),
    ("SELECT 1; DO $$ BEGIN END $$", DoBlock, 1),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", CreateFunction, 0),
    ("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", CreateFunction, 0),
    ("CREATE PROCEDURE p() LANGUAGE sql AS 'select 1'", CreateFunction, 0),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'select 1'", CreateFunction, 0),
    ("CREATE FUNCTION f() RETURNS text BEGIN ATOMIC SELECT set_config('a','b',false); END", CreateFunction, 0),
    ("CREATE FUNCTION g() RETURNS text LANGUAGE sql SET role = 'other' AS 'select 1'", CreateFunction, 0),
    ("LISTEN ch", Listen, 0),
    ("listen \"Ch\"", Listen, 0),
    ("COPY t TO PROGRAM 'x'", CopyProgram, 0),
    ("COPY t FROM PROGRAM 'x'", CopyProgram, 0),
    ("COPY (SELECT 1) TO PROGRAM 'cat'", CopyProgram, 0),
    // Dynamic SQL builtins: each ran a hidden set_config on PG 15.
    ("SELECT query_to_xml('select set_config(''a'',''b'',false)', true, false, '')", DynamicSql, 0),
    ("SELECT pg_catalog.query_to_xml_and_xmlschema('select 1', true, false, '')", DynamicSql, 0),
    ("SELECT * FROM ts_stat('select to_tsvector(''x'')')", DynamicSql, 0),
    ("SELECT ts_rewrite('a'::tsquery, 'select ''a''::tsquery, ''b''::tsquery')", DynamicSql, 0),
    ("SELECT * FROM crosstab('select set_config(''a'',''b'',false), 1, 1') AS (a text, b text)", DynamicSql, 0),
    ("SELECT * FROM public.crosstab3('select 1')", DynamicSql, 0),
    ("SELECT * FROM connectby('t', 'k', 'p /*', '*/ x', 0) AS t(k text, p text, l int)", DynamicSql, 0),
    ("CREATE OPERATOR <<>> (function = ts_rewrite, leftarg = tsquery, rightarg = text)", DynamicSql, 0),
    ("CREATE AGGREGATE a(text) (sfunc = E'\\164s_rewrite', stype = tsquery)", DynamicSql, 0),
    // Settings that change how the server reads statement text.
    ("SET client_encoding = 'SJIS'", ParserSetting, 0),
    ("SET NAMES 'BIG5'", ParserSetting, 0),
    ("set client_encoding to gbk", ParserSetting, 0),
    ("SET client_encoding = 6", ParserSetting, 0),
    ("SET standard_conforming_strings = off", ParserSetting, 0),
    ("SET standard_conforming_strings TO false", ParserSetting, 0),
    ("SET LOCAL standard_conforming_strings = 0", ParserSetting, 0),
    ("SET \"Standard_Conforming_Strings\" = 'no'", ParserSetting, 0),
    // Texts libpg_query 18 cannot read but PostgreSQL 15 runs.
    ("WITH system_user AS (SELECT 1) SELECT set_config($$a$$,$$b$$,false) FROM system_user", Unparsable, 0),
];

/// Forwarded with the default config.
const ALLOWED: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "INSERT INTO t (tenant_id, v) VALUES ('a', 1)",
    "DELETE FROM t WHERE v = 1",
    "COPY t TO STDOUT",
    "COPY t FROM STDIN WITH (FORMAT csv)",
    "COPY t TO '/tmp/x'",
    "SET search_path = public",
    "SET application_name = 'x'",
    "SET app.other_setting = 1",
    "SET app.current_tenant = 'x'",
    "SET app.current_tenant_id2 = 'x'",
    "SET myapp.current_tenant_id = 'x'",
    // \0074 is 't': this names app.currenttenant_id, a different setting.
    "SET U&\"app\".U&\"current\\0074enant_id\" = 'x'",
    "SELECT 'set_config(''app.current_tenant_id'', ''x'', false)'",
    "SELECT 'SET app.current_tenant_id = 1'",
    "SELECT $$ SET app.current_tenant_id = 'x' $$",
    "SELECT set_config FROM t",
    "SELECT t.set_config FROM t",
    "SELECT x AS set_config FROM t",
    "CREATE TABLE t3 (set_config text)",
    "SELECT current_setting('app.current_tenant_id')",
    "SELECT current_setting('app.current_tenant_id', true)",
    "BEGIN; SELECT 1; COMMIT",
    "SHOW app.current_tenant_id",
    "SHOW ALL",
    "-- SET app.current_tenant_id = 'x'\nSELECT 1",
    "/* SET app.current_tenant_id = 'x'; select set_config('a','b',false) */ SELECT 1",
    "SELECT 1 -- DO $$ $$",
    "SET client_encoding = 'UTF8'",
    "SET NAMES 'utf-8'",
    "SET client_encoding TO DEFAULT",
    "RESET client_encoding",
    "SET standard_conforming_strings = on",
    "RESET standard_conforming_strings",
    "SET TIME ZONE 'UTC'",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET statement_timeout = '5s'",
    "SET LOCAL lock_timeout = 1000",
    "RESET search_path",
    "SELECT * FROM pg_settings WHERE name = 'search_path'",
    "SELECT 'C:\\path\\'",
    "UPDATE t SET p = replace(p, '\\', '/')",
    "SELECT E'\\''",
    "SELECT ts_lexize('english_stem', 'stars')",
    "ALTER TABLE t ADD COLUMN w int",
    "ALTER TABLE t ALTER COLUMN w SET DEFAULT 1",
    "EXPLAIN SELECT 1",
    "PREPARE q AS SELECT * FROM t WHERE v = $1",
    "EXECUTE q(1)",
    "DEALLOCATE q",
    "NOTIFY ch, 'x'",
    "UNLISTEN *",
    "SELECT do_something FROM t",
    "SELECT 1 LIMIT 5 OFFSET 10",
    "SELECT 1\0SET app.current_tenant_id = 'x'",
    "",
    "  ",
    ";",
    // Syntax errors with nothing the rules look for: the server reports them.
    "SELEC 1",
    "SELECT FROM WHERE",
];

fn guard() -> Guard {
    Guard::new(GuardConfig::default())
}

#[test]
fn blocks_the_corpus() {
    let g = guard();
    for &(sql, rule, statement) in BLOCKED {
        assert_eq!(g.check(sql), Err(Violation { rule, statement }), "{sql:?}");
    }
}

#[test]
fn allows_the_corpus() {
    let g = guard();
    for &sql in ALLOWED {
        assert_eq!(g.check(sql), Ok(()), "{sql:?}");
    }
}

/// The prefilter never changes a verdict: a text it clears is one the parse allows.
#[test]
fn prefilter_agrees_with_the_parse() {
    let g = guard();
    let all = BLOCKED.iter().map(|b| b.0).chain(ALLOWED.iter().copied());
    for sql in all {
        let sql = sql.split('\0').next().unwrap_or_default();
        if !prefilter::may_match(sql) {
            assert_eq!(g.judge(sql), Ok(()), "prefilter cleared {sql:?}");
        }
    }
    for &(sql, ..) in BLOCKED {
        assert!(prefilter::may_match(sql), "{sql:?}");
    }
}

#[test]
fn standard_conforming_strings_smuggling_needs_the_second_parse() {
    let g = guard();
    let sql =
        "SELECT '\\' AS x, ' AS y, set_config($a$app.current_tenant_id$a$, $a$b$a$, false) --'";
    assert_eq!(g.judge_parsed(sql, ParserOptions::DEFAULT), Some(Ok(())));
    let off = ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    assert!(matches!(g.judge_parsed(sql, off), Some(Err(_))));
}

fn chain(head: &str, terms: usize) -> String {
    format!("SELECT {head}{}", " + 1".repeat(terms))
}

/// Trees deeper than prost decodes: the server runs them, the guard cannot look inside.
#[test]
fn too_deep_to_decode_is_cleared_only_by_the_prefilter() {
    let g = guard();
    let deep_call = chain("length(set_config('a','b',false))", 60);
    assert_eq!(g.judge_parsed(&deep_call, ParserOptions::DEFAULT), None);
    assert_eq!(
        g.check(&deep_call),
        Err(Violation {
            rule: Unparsable,
            statement: 0
        })
    );
    assert_eq!(g.check(&chain("1", 60)), Ok(()));
    // Shallow enough to decode: the real rule.
    assert_eq!(
        g.check(&chain("length(set_config('a','b',false))", 20))
            .map_err(|v| v.rule),
        Err(SetConfig)
    );
}

/// Inputs far deeper than any real query: a verdict, not a crash (prost and libpg_query
/// both bound their recursion, and so the walk is bounded).
#[test]
fn absurdly_deep_inputs_get_a_verdict() {
    let g = guard();
    let parens = format!(
        "SELECT {}set_config('a','b',false){}",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    assert!(g.check(&parens).is_err());
    let arrays = format!(
        "SELECT {}1{} FROM t",
        "ARRAY[".repeat(2_000),
        "]".repeat(2_000)
    );
    assert_eq!(g.check(&arrays), Ok(()));
    let arrays = format!(
        "UPDATE t SET v = {}1{}",
        "ARRAY[".repeat(2_000),
        "]".repeat(2_000)
    );
    assert_eq!(g.check(&arrays).map_err(|v| v.rule), Err(Unparsable));
    assert_eq!(g.check_uncached(&chain("1", 100_000)), Ok(()));
    let deep_update = format!("UPDATE t SET v = 1{}", " + 1".repeat(100_000));
    assert_eq!(g.check(&deep_update).map_err(|v| v.rule), Err(Unparsable));
}

#[test]
fn toggles_turn_rules_off() {
    let off = Guard::new(GuardConfig {
        block_do: false,
        block_create_function: false,
        block_listen: false,
        block_copy_program: false,
        block_dynamic_sql: false,
        ..GuardConfig::default()
    });
    for sql in [
        // The set_config inside is a string to the parser: this is why DO is blocked by default.
        "DO $$ BEGIN PERFORM set_config('app.current_tenant_id','x',false); END $$",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
        "CREATE PROCEDURE p() LANGUAGE sql AS 'select 1'",
        "LISTEN ch",
        "COPY t TO PROGRAM 'x'",
        "COPY t FROM PROGRAM 'x'",
        "SELECT query_to_xml('select 1', true, false, '')",
        "SELECT * FROM ts_stat('select 1')",
    ] {
        assert_eq!(off.check(sql), Ok(()), "{sql:?}");
    }
    // What a function definition carries is still checked.
    for (sql, rule) in [
        ("CREATE FUNCTION f() RETURNS text BEGIN ATOMIC SELECT set_config('a','b',false); END", SetConfig),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.current_tenant_id = 'x' AS 'select 1'", TenantSetting),
        ("CREATE FUNCTION g() RETURNS text LANGUAGE sql SET role = 'other' AS 'select 1'", SetRole),
        ("CREATE FUNCTION h() RETURNS int LANGUAGE sql SET client_encoding = 'sjis' AS 'select 1'", ParserSetting),
    ] {
        assert_eq!(off.check(sql).map_err(|v| v.rule), Err(rule), "{sql:?}");
    }
}

#[test]
fn strict_mode_blocks_every_unparsable_text() {
    let strict = Guard::new(GuardConfig {
        block_unparsable: true,
        ..GuardConfig::default()
    });
    for sql in ["SELEC 1", "SELECT FROM WHERE", &chain("1", 60)] {
        assert_eq!(
            strict.check(sql).map_err(|v| v.rule),
            Err(Unparsable),
            "{sql:?}"
        );
    }
    assert_eq!(strict.check("SELECT 1"), Ok(()));
}

#[test]
fn tenant_setting_is_configurable() {
    let g = Guard::new(GuardConfig {
        tenant_setting: "myapp.Tenant".into(),
        ..GuardConfig::default()
    });
    assert_eq!(
        g.check("SET myapp.tenant = 'x'").map_err(|v| v.rule),
        Err(TenantSetting)
    );
    assert_eq!(
        g.check("SET \"MYAPP\".\"TENANT\" = 'x'")
            .map_err(|v| v.rule),
        Err(TenantSetting)
    );
    assert_eq!(g.check("SET app.current_tenant_id = 'x'"), Ok(()));
}

#[test]
fn cached_verdicts_match_fresh_ones() {
    let cached = guard();
    let uncached = Guard::with_cache_limits(
        GuardConfig::default(),
        CacheLimits {
            max_entries: 0,
            ..CacheLimits::default()
        },
    );
    let all = BLOCKED.iter().map(|b| b.0).chain(ALLOWED.iter().copied());
    for sql in all {
        let first = cached.check(sql);
        assert_eq!(cached.check(sql), first, "{sql:?}");
        assert_eq!(uncached.check(sql), first, "{sql:?}");
        assert_eq!(uncached.check_uncached(sql), first, "{sql:?}");
    }
    assert!(cached.cached() > 0);
    assert_eq!(uncached.cached(), 0);
}

#[test]
fn cache_respects_its_bounds() {
    let limits = CacheLimits {
        max_entries: 5,
        max_bytes: 1 << 20,
        max_text: 64,
    };
    let g = Guard::with_cache_limits(GuardConfig::default(), limits);
    for i in 0..50 {
        // "SET" sends each text past the prefilter into the cache.
        let sql = format!("UPDATE t SET v = {i}");
        assert_eq!(g.check(&sql), Ok(()));
        assert!(g.cached() <= 5, "{} entries", g.cached());
    }
    let long = format!(
        "UPDATE t SET v = 1 WHERE {}",
        "v = 1 AND ".repeat(10) + "true"
    );
    let before = g.cached();
    assert_eq!(g.check(&long), Ok(()));
    assert!(g.cached() <= before, "a text over max_text was cached");

    let by_bytes = Guard::with_cache_limits(
        GuardConfig::default(),
        CacheLimits {
            max_entries: 1000,
            max_bytes: 100,
            max_text: 64,
        },
    );
    for i in 0..50 {
        assert!(by_bytes.check(&format!("UPDATE t SET v = {i}")).is_ok());
        assert!(by_bytes.cached() <= 100 / "UPDATE t SET v = 0".len() + 1);
    }
}

#[test]
fn rules_have_distinct_labels_and_messages_naming_them() {
    let mut labels: Vec<_> = Rule::ALL.iter().map(Rule::label).collect();
    for rule in Rule::ALL {
        assert!(rule.message().contains(rule.label()), "{rule}");
    }
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Rule::ALL.len());
}

#[test]
fn config_deserializes_with_defaults() {
    let cfg: GuardConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, GuardConfig::default());
    assert!(cfg.block_do && cfg.block_create_function && cfg.block_listen);
    assert!(cfg.block_copy_program && cfg.block_dynamic_sql && !cfg.block_unparsable);
    let cfg: GuardConfig =
        toml::from_str("tenant_setting = \"x.y\"\nblock_do = false\nblock_unparsable = true")
            .unwrap();
    assert_eq!(cfg.tenant_setting, "x.y");
    assert!(!cfg.block_do && cfg.block_listen && cfg.block_unparsable);
    assert!(toml::from_str::<GuardConfig>("block_everything = true").is_err());
}

#[test]
fn guard_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Guard>();
}
