//! The SQL guard: decides from statement text, with PostgreSQL's own grammar (libpg_query),
//! whether a statement that could escape or disturb tenant isolation must be blocked.
//!
//! Use: one [`Guard`] per shared upstream, shared by its sessions; call [`Guard::check`] on
//! every simple-Query string and every Parse statement text before forwarding it. It is
//! synchronous, does no I/O, and caches verdicts by text.
//!
//! How a text is judged:
//! 1. Cut at the first NUL: the server reads a query string only that far.
//! 2. `prefilter`: if no keyword or name any rule needs occurs in the text, it is
//!    forwarded without a parse (provably safe; see that module).
//! 3. The verdict cache.
//! 4. Parse. Every statement's whole tree is walked (`walk`) and the `rules` applied to
//!    every node. If the text has a backslash it is parsed a second time as the server
//!    would with `standard_conforming_strings = off`, and a violation seen either way
//!    blocks (defence in depth: [`Rule::ParserSetting`] already keeps that setting on).
//! 5. Text that does not parse is forwarded only if the prefilter proves it harmless;
//!    otherwise it is blocked as [`Rule::Unparsable`] (or always, with `block_unparsable`).
//!    "The server will reject it too" is not a safe assumption: libpg_query 18 rejects
//!    `WITH system_user AS (...)`, which PostgreSQL 15 runs (a keyword reserved since 16),
//!    and it cannot decode trees deeper than 100 messages (about 48 chained operators),
//!    which the server runs. Both were checked on PostgreSQL 15 with a `set_config` inside.
//!
//! What a text guard cannot see (why the tenant context must not rely on it, see
//! `design/isolation.md`): SQL built at run time (`DO`, functions, dynamic-SQL builtins:
//! blocked by default, but `EXECUTE` in an existing function is not), the statement behind
//! `EXECUTE name` (its `PREPARE` text was checked when sent), and objects created earlier.
//!
//! Assumptions the caller must keep: the text is the exact bytes the server will read,
//! decoded as strict UTF-8 (never lossily), and the server session's `client_encoding` is
//! UTF8. In an encoding such as SJIS a byte 0x5C (`\`) can be the second half of a
//! character, so the server and the guard split strings differently; a `set_config` hidden
//! that way ran on PostgreSQL 15. `SET client_encoding` is blocked for that reason, but the
//! startup parameter is the relay's to pin.

mod cache;
mod prefilter;
mod rules;
#[cfg(test)]
mod tests;
mod walk;

use std::fmt;

use pg_query::ParserOptions;
use serde::Deserialize;

pub use cache::CacheLimits;
use cache::VerdictCache;
use rules::Inspector;
use walk::{walk, Stopped};

/// Guard settings, embedded in a shared upstream's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// The session setting that carries the tenant (compared ignoring ASCII case, as
    /// PostgreSQL does). Default `app.current_tenant_id`; the caller sets it from the
    /// upstream's `tenant_setting`.
    #[serde(default = "GuardConfig::default_tenant_setting")]
    pub tenant_setting: String,
    /// Block `DO` blocks: their body is a string the guard cannot see into. Default true.
    #[serde(default = "yes")]
    pub block_do: bool,
    /// Block `CREATE [OR REPLACE] FUNCTION/PROCEDURE`. Default true.
    #[serde(default = "yes")]
    pub block_create_function: bool,
    /// Block `LISTEN` (a listener pins server state across tenants). Default true.
    #[serde(default = "yes")]
    pub block_listen: bool,
    /// Block `COPY ... TO/FROM PROGRAM`. Default true.
    #[serde(default = "yes")]
    pub block_copy_program: bool,
    /// Block functions that run SQL passed as a string (`query_to_xml*`, `ts_stat`,
    /// `ts_rewrite`, `tablefunc`'s `crosstab*` and `connectby`). Default true.
    #[serde(default = "yes")]
    pub block_dynamic_sql: bool,
    /// Block every text that does not parse, not just those the prefilter cannot clear.
    /// Default false.
    #[serde(default)]
    pub block_unparsable: bool,
}

fn yes() -> bool {
    true
}

impl GuardConfig {
    fn default_tenant_setting() -> String {
        "app.current_tenant_id".into()
    }
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            tenant_setting: GuardConfig::default_tenant_setting(),
            block_do: true,
            block_create_function: true,
            block_listen: true,
            block_copy_program: true,
            block_dynamic_sql: true,
            block_unparsable: false,
        }
    }
}

/// Why a statement was blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `SET`/`SET LOCAL`/`RESET`/`SET ... TO DEFAULT` of the tenant setting, also inside
    /// `ALTER ... SET` and a function's `SET` clause.
    TenantSetting,
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD` of any kind.
    Discard,
    /// A call of (or a function binding to) `set_config`, or a write to `pg_settings`.
    SetConfig,
    /// `SET ROLE`, `RESET ROLE`.
    SetRole,
    /// `SET SESSION AUTHORIZATION`, `RESET SESSION AUTHORIZATION`.
    SessionAuthorization,
    /// `ALTER ROLE`/`ALTER USER`/`ALTER GROUP`, including `... SET`, `... RENAME`.
    AlterRole,
    /// `DO` (configurable).
    DoBlock,
    /// `CREATE [OR REPLACE] FUNCTION/PROCEDURE` (configurable).
    CreateFunction,
    /// `LISTEN` (configurable).
    Listen,
    /// `COPY ... PROGRAM` (configurable).
    CopyProgram,
    /// A function that runs SQL from a string (configurable).
    DynamicSql,
    /// `client_encoding` set to other than UTF8, or `standard_conforming_strings` to other
    /// than on: either makes the server read statement text differently from the guard.
    ParserSetting,
    /// The text did not parse and could not be cleared without a parse.
    Unparsable,
}

impl Rule {
    /// Every rule, for tests and metric registration.
    pub const ALL: [Rule; 14] = [
        Rule::TenantSetting,
        Rule::ResetAll,
        Rule::Discard,
        Rule::SetConfig,
        Rule::SetRole,
        Rule::SessionAuthorization,
        Rule::AlterRole,
        Rule::DoBlock,
        Rule::CreateFunction,
        Rule::Listen,
        Rule::CopyProgram,
        Rule::DynamicSql,
        Rule::ParserSetting,
        Rule::Unparsable,
    ];

    /// Stable snake_case name, for metric labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Rule::TenantSetting => "tenant_setting",
            Rule::ResetAll => "reset_all",
            Rule::Discard => "discard",
            Rule::SetConfig => "set_config",
            Rule::SetRole => "set_role",
            Rule::SessionAuthorization => "session_authorization",
            Rule::AlterRole => "alter_role",
            Rule::DoBlock => "do_block",
            Rule::CreateFunction => "create_function",
            Rule::Listen => "listen",
            Rule::CopyProgram => "copy_program",
            Rule::DynamicSql => "dynamic_sql",
            Rule::ParserSetting => "parser_setting",
            Rule::Unparsable => "unparsable",
        }
    }

    /// Client-facing message naming the rule (sent with SQLSTATE 42501 by the caller).
    pub fn message(&self) -> &'static str {
        match self {
            Rule::TenantSetting => "blocked by pgtenant (tenant_setting): the tenant setting is managed by the proxy",
            Rule::ResetAll => "blocked by pgtenant (reset_all): RESET ALL would clear the tenant context",
            Rule::Discard => "blocked by pgtenant (discard): DISCARD is not allowed; the proxy resets connections itself",
            Rule::SetConfig => "blocked by pgtenant (set_config): set_config() and writes to pg_settings are not allowed",
            Rule::SetRole => "blocked by pgtenant (set_role): SET ROLE and RESET ROLE are not allowed",
            Rule::SessionAuthorization => "blocked by pgtenant (session_authorization): SET SESSION AUTHORIZATION is not allowed",
            Rule::AlterRole => "blocked by pgtenant (alter_role): ALTER ROLE and ALTER USER are not allowed",
            Rule::DoBlock => "blocked by pgtenant (do_block): DO blocks are not allowed",
            Rule::CreateFunction => "blocked by pgtenant (create_function): CREATE FUNCTION and CREATE PROCEDURE are not allowed",
            Rule::Listen => "blocked by pgtenant (listen): LISTEN is not allowed on shared connections",
            Rule::CopyProgram => "blocked by pgtenant (copy_program): COPY ... PROGRAM is not allowed",
            Rule::DynamicSql => "blocked by pgtenant (dynamic_sql): functions that run SQL from a string (query_to_xml, ts_stat, ts_rewrite, crosstab) are not allowed",
            Rule::ParserSetting => "blocked by pgtenant (parser_setting): client_encoding must stay UTF8 and standard_conforming_strings on",
            Rule::Unparsable => "blocked by pgtenant (unparsable): the statement could not be parsed by the SQL guard",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A blocked statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    /// 0-based index of the offending statement in a multi-statement text (0 for
    /// [`Rule::Unparsable`], which has no statements).
    pub statement: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (statement {})", self.rule.message(), self.statement)
    }
}

impl std::error::Error for Violation {}

/// The outcome of a check: forward, or block.
type Verdict = Result<(), Violation>;

/// Checks statement text against the rules. `Send + Sync`: share one per upstream.
pub struct Guard {
    cfg: GuardConfig,
    cache: VerdictCache,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("cfg", &self.cfg)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Guard {
    pub fn new(cfg: GuardConfig) -> Guard {
        Guard::with_cache_limits(cfg, CacheLimits::default())
    }

    pub fn with_cache_limits(cfg: GuardConfig, limits: CacheLimits) -> Guard {
        Guard {
            cfg,
            cache: VerdictCache::new(limits),
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// Number of cached verdicts.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Checks a simple-Query string or a Parse statement text (a multi-statement text
    /// statement by statement). `Ok(())`: forward it. Pure except for the cache.
    ///
    /// Cost (release build): about 0.1 µs when the prefilter or the cache answers, 4-8 µs
    /// per statement when it parses (nearly all of it libpg_query).
    pub fn check(&self, sql: &str) -> Result<(), Violation> {
        let sql = sql.split('\0').next().unwrap_or_default();
        if !self.cfg.block_unparsable && !prefilter::may_match(sql) {
            return Ok(());
        }
        if let Some(verdict) = self.cache.get(sql) {
            return verdict;
        }
        let verdict = self.judge(sql);
        self.cache.insert(sql, &verdict);
        verdict
    }

    /// [`check`](Self::check) without the prefilter and the cache: always parses. For
    /// benchmarks and tests; the verdict is the same.
    pub fn check_uncached(&self, sql: &str) -> Result<(), Violation> {
        self.judge(sql.split('\0').next().unwrap_or_default())
    }

    /// Parses and applies the rules, without the prefilter or the cache.
    fn judge(&self, sql: &str) -> Verdict {
        match self.judge_parsed(sql, ParserOptions::DEFAULT) {
            Some(Err(violation)) => Err(violation),
            None => self.unparsable(sql),
            Some(Ok(())) if sql.contains('\\') => {
                // Only a violation counts here: with standard_conforming_strings pinned on,
                // a text that does not parse this way is harmless.
                let off = ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
                match self.judge_parsed(sql, off) {
                    Some(Err(violation)) => Err(violation),
                    _ => Ok(()),
                }
            }
            Some(Ok(())) => Ok(()),
        }
    }

    /// `None` if the text does not parse (or its tree cannot be decoded).
    fn judge_parsed(&self, sql: &str, options: ParserOptions) -> Option<Verdict> {
        let parsed = pg_query::parse(sql, options).ok()?;
        for (statement, raw) in parsed.protobuf.stmts.iter().enumerate() {
            let Some(stmt) = raw.stmt.as_deref() else {
                continue;
            };
            let mut inspector = Inspector::new(&self.cfg);
            let rule = match walk(stmt, &mut inspector) {
                Ok(()) => continue,
                Err(Stopped::ByVisitor) => inspector.found.unwrap_or(Rule::Unparsable),
                // Not expected; fail closed.
                Err(Stopped::Failed) => Rule::Unparsable,
            };
            return Some(Err(Violation { rule, statement }));
        }
        Some(Ok(()))
    }

    fn unparsable(&self, sql: &str) -> Verdict {
        if self.cfg.block_unparsable || prefilter::may_match(sql) {
            Err(Violation {
                rule: Rule::Unparsable,
                statement: 0,
            })
        } else {
            Ok(())
        }
    }
}
