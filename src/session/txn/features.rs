//! Transaction mode: which client statements need session state on the server (and so
//! cannot move between server connections), and which are ordinary `SET`s that pgtenant
//! tracks and re-applies. Pure: a keyword prefilter, then libpg_query only on a hit.
//!
//! Why this is safe even when detection misses something: a server connection only moves
//! to another tenant after `DISCARD ALL` (see `pool::txn_pool`), which drops temp tables,
//! prepared statements, cursors, advisory locks, LISTEN and settings. A miss here can only
//! let session state reach another client of the *same* tenant, never another tenant.

use pg_query::protobuf::{self, a_const::Val, node::Node as N, OnCommitAction, VariableSetKind};
use pg_query::ParserOptions;

/// A session-only feature (the metric label is `label`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Session `SET`/`RESET` of a parameter outside the tracked list (or a form pgtenant
    /// cannot re-apply), `RESET ALL`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `DISCARD`.
    SessionSet,
    Listen,
    AdvisoryLock,
    HoldCursor,
    SqlPrepare,
    TempTable,
    /// `LOAD`: a library loaded into the backend.
    Load,
    /// Text with a keyword of the above that libpg_query cannot parse: pinned, to be safe.
    Unparsed,
    /// A named statement first used in the middle of a request cycle whose first messages
    /// already reached the server (`relay::engage`): always pinned, never refused.
    NamedMidCycle,
}

impl Feature {
    pub fn label(self) -> &'static str {
        match self {
            Feature::SessionSet => "session_set",
            Feature::Listen => "listen",
            Feature::AdvisoryLock => "advisory_lock",
            Feature::HoldCursor => "with_hold_cursor",
            Feature::SqlPrepare => "sql_prepare",
            Feature::TempTable => "temp_table",
            Feature::Load => "load",
            Feature::Unparsed => "unparsed",
            Feature::NamedMidCycle => "named_statement_mid_cycle",
        }
    }

    /// For the client's error message.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::SessionSet => "a session-level SET/RESET of this parameter",
            Feature::Listen => "LISTEN",
            Feature::AdvisoryLock => "a session-level advisory lock (use pg_advisory_xact_lock)",
            Feature::HoldCursor => "a WITH HOLD cursor",
            Feature::SqlPrepare => "SQL PREPARE",
            Feature::TempTable => "a temporary table, view or sequence without ON COMMIT DROP",
            Feature::Load => "LOAD",
            Feature::Unparsed => "this statement",
            Feature::NamedMidCycle => "a named statement after unsynced messages",
        }
    }
}

/// A change to a tracked (re-appliable) parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    Set(String, String),
    Reset(String),
    /// `RESET ALL` on an upstream without the guard: every client setting is gone.
    ResetAll,
}

/// What one Query or Parse text does to the session.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// The first session-only feature found.
    pub feature: Option<Feature>,
    pub changes: Vec<SettingChange>,
}

/// Parameters whose session value pgtenant tracks per client and re-applies (with bind
/// parameters) when the client lands on another server connection. Lower case.
pub const TRACKED: &[&str] = &[
    "application_name",
    "bytea_output",
    "client_min_messages",
    "datestyle",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "intervalstyle",
    "lock_timeout",
    "search_path",
    "statement_timeout",
    "timezone",
    "work_mem",
];

/// `CURSOR_OPT_HOLD` in PostgreSQL's parsenodes.h.
const CURSOR_OPT_HOLD: i32 = 0x0020;

/// Words after which a statement may need a look (whole words, ASCII case-insensitive).
const WORDS: &[&str] = &[
    "listen",
    "declare",
    "prepare",
    "temp",
    "temporary",
    "load",
    "discard",
];
/// Words that only matter where a statement starts (`UPDATE t SET ...` needs no parse).
const LEADING_WORDS: &[&str] = &["set", "reset"];

pub fn inspect(sql: &str) -> Inspection {
    let Prefilter { advisory, keyword } = prefilter(sql);
    if !advisory && !keyword {
        return Inspection::default();
    }
    let mut out = Inspection::default();
    if advisory {
        out.feature = Some(Feature::AdvisoryLock);
    }
    let Ok(parsed) = pg_query::parse(sql, ParserOptions::DEFAULT) else {
        out.feature.get_or_insert(Feature::Unparsed);
        return out;
    };
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let found = statement(node, &mut out.changes);
        if out.feature.is_none() {
            out.feature = found;
        }
    }
    out
}

/// The feature one top-level statement needs, recording tracked setting changes.
fn statement(node: &N, changes: &mut Vec<SettingChange>) -> Option<Feature> {
    match node {
        N::VariableSetStmt(s) => variable_set(s, changes),
        N::DiscardStmt(_) => Some(Feature::SessionSet),
        N::ListenStmt(_) => Some(Feature::Listen),
        N::PrepareStmt(_) => Some(Feature::SqlPrepare),
        N::LoadStmt(_) => Some(Feature::Load),
        N::DeclareCursorStmt(d) if d.options & CURSOR_OPT_HOLD != 0 => Some(Feature::HoldCursor),
        N::CreateStmt(c) => temp(c.relation.as_ref(), c.oncommit),
        N::CreateTableAsStmt(c) => {
            let into = c.into.as_deref()?;
            temp(into.rel.as_ref(), into.on_commit)
        }
        N::CreateSeqStmt(c) => temp(c.sequence.as_ref(), OnCommitAction::OncommitNoop as i32),
        N::ViewStmt(v) => temp(v.view.as_ref(), OnCommitAction::OncommitNoop as i32),
        // `EXPLAIN ANALYZE` runs its statement; `SELECT ... INTO TEMP` is a SelectStmt.
        N::ExplainStmt(e) => e
            .query
            .as_deref()
            .and_then(|q| q.node.as_ref())
            .and_then(|q| statement(q, changes)),
        N::SelectStmt(s) => {
            let into = s.into_clause.as_deref()?;
            temp(into.rel.as_ref(), into.on_commit)
        }
        _ => None,
    }
}

fn temp(rel: Option<&protobuf::RangeVar>, on_commit: i32) -> Option<Feature> {
    let temporary = rel.is_some_and(|r| r.relpersistence == "t");
    (temporary && on_commit != OnCommitAction::OncommitDrop as i32).then_some(Feature::TempTable)
}

fn variable_set(
    s: &protobuf::VariableSetStmt,
    changes: &mut Vec<SettingChange>,
) -> Option<Feature> {
    if s.is_local {
        // SET LOCAL ends with the transaction: nothing to carry.
        return None;
    }
    let name = s.name.to_ascii_lowercase();
    let kind = VariableSetKind::try_from(s.kind).unwrap_or(VariableSetKind::Undefined);
    match kind {
        // SET TRANSACTION ...: this transaction only.
        VariableSetKind::VarSetMulti if name == "transaction" => None,
        VariableSetKind::VarResetAll => {
            changes.push(SettingChange::ResetAll);
            None
        }
        VariableSetKind::VarReset | VariableSetKind::VarSetDefault if is_tracked(&name) => {
            changes.push(SettingChange::Reset(name));
            None
        }
        VariableSetKind::VarSetValue if is_tracked(&name) => match flatten(&name, &s.args) {
            Some(value) => {
                changes.push(SettingChange::Set(name, value));
                None
            }
            None => Some(Feature::SessionSet),
        },
        _ => Some(Feature::SessionSet),
    }
}

fn is_tracked(name: &str) -> bool {
    TRACKED.contains(&name)
}

/// The value text PostgreSQL itself would build from the SET arguments
/// (`flatten_set_variable_args`): list items joined by ", ", list-quoted parameters
/// (search_path) with identifiers double-quoted. `None` for forms not handled here
/// (typed literals such as `INTERVAL '1' HOUR`), which then pin.
fn flatten(name: &str, args: &[protobuf::Node]) -> Option<String> {
    let list = name == "search_path";
    if args.is_empty() || (!list && args.len() != 1) {
        return None;
    }
    let mut out = String::new();
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let N::AConst(c) = arg.node.as_ref()? else {
            return None;
        };
        match c.val.as_ref()? {
            Val::Ival(v) => out.push_str(&v.ival.to_string()),
            Val::Fval(v) => out.push_str(&v.fval),
            Val::Sval(v) if list => quote_ident(&v.sval, &mut out),
            Val::Sval(v) => out.push_str(&v.sval),
            Val::Boolval(v) => out.push_str(if v.boolval { "on" } else { "off" }),
            Val::Bsval(_) => return None,
        }
    }
    Some(out)
}

/// PostgreSQL's `quote_identifier` as list-quoted parameters need it: quoted unless plain
/// lower-case (keywords need no quotes inside a setting's value, which is split, not parsed).
fn quote_ident(name: &str, out: &mut String) {
    let plain = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        out.push_str(name);
    } else {
        out.push('"');
        out.push_str(&name.replace('"', "\"\""));
        out.push('"');
    }
}

/// What the keyword prefilter found in a statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefilter {
    /// A session advisory lock function is named (`pg_advisory_lock*`,
    /// `pg_try_advisory_lock*`), wherever it appears: a string literal holding the name pins
    /// too (pinning is always safe). `_xact_` variants do not match.
    advisory: bool,
    /// A word of `WORDS`, or of `LEADING_WORDS` where a statement may start.
    keyword: bool,
}

/// Names that, inside a word, mean a session advisory lock (lower case).
const ADVISORY: &[&[u8]] = &[b"pg_advisory_lock", b"pg_try_advisory_lock"];

/// The keyword prefilter in one pass over the text (it runs on every Query and Parse in
/// transaction mode, so it is on the hot path): the text is split into words (runs of
/// identifier bytes) and each word is compared, case-insensitively, with the lists.
/// A word of `LEADING_WORDS` counts where a statement may start: at the beginning or after
/// `;` (whitespace between), or anywhere once the text holds a comment (a comment may sit
/// between `;` and the word): never a false "no".
fn prefilter(sql: &str) -> Prefilter {
    let h = sql.as_bytes();
    let commented = h.windows(2).any(|w| w == b"--" || w == b"/*");
    let mut found = Prefilter {
        advisory: false,
        keyword: false,
    };
    // The last byte before the current word that is not whitespace.
    let mut before: Option<u8> = None;
    let mut i = 0;
    while i < h.len() {
        if !is_ident(h[i]) {
            if !h[i].is_ascii_whitespace() {
                before = Some(h[i]);
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < h.len() && is_ident(h[i]) {
            i += 1;
        }
        let word = &h[start..i];
        let eq = |w: &&str| word.eq_ignore_ascii_case(w.as_bytes());
        if WORDS.iter().any(eq)
            || ((commented || before.is_none_or(|b| b == b';')) && LEADING_WORDS.iter().any(eq))
        {
            found.keyword = true;
        }
        if word.len() >= ADVISORY[0].len()
            && ADVISORY.iter().any(|name| {
                word.windows(name.len())
                    .any(|w| w.eq_ignore_ascii_case(name))
            })
        {
            found.advisory = true;
        }
        before = Some(h[i - 1]);
    }
    found
}

/// A byte that continues an identifier (PostgreSQL also allows `$` and any non-ASCII byte).
fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(sql: &str) -> Option<Feature> {
        inspect(sql).feature
    }

    #[test]
    fn ordinary_statements_need_nothing() {
        for sql in [
            "SELECT 1",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 3",
            "BEGIN; SELECT pg_advisory_xact_lock(1); COMMIT",
            "SELECT pg_try_advisory_xact_lock(1)",
            "DECLARE c CURSOR FOR SELECT 1",
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "SET LOCAL search_path = a",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "select 'listen' as settings",
        ] {
            assert_eq!(inspect(sql), Inspection::default(), "{sql}");
        }
    }

    #[test]
    fn session_features_are_found() {
        use Feature::*;
        for (sql, want) in [
            ("LISTEN chan", Listen),
            ("select pg_advisory_lock(1)", AdvisoryLock),
            ("SELECT PG_TRY_ADVISORY_LOCK(1)", AdvisoryLock),
            ("select pg_advisory_lock_shared(7)", AdvisoryLock),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", HoldCursor),
            ("PREPARE p AS SELECT 1", SqlPrepare),
            ("CREATE TEMP TABLE t (x int)", TempTable),
            (
                "create temporary table t (x int) on commit delete rows",
                TempTable,
            ),
            ("CREATE TEMP TABLE t AS SELECT 1", TempTable),
            ("SELECT 1 INTO TEMP t", TempTable),
            ("CREATE TEMP VIEW v AS SELECT 1", TempTable),
            ("SET ROLE other", SessionSet),
            ("SET enable_seqscan = off", SessionSet),
            ("SET SESSION AUTHORIZATION x", SessionSet),
            ("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE", SessionSet),
            ("DISCARD ALL", SessionSet),
            ("LOAD 'auto_explain'", Load),
            ("SELECT 1; LISTEN x", Listen),
            ("set search_path = (", Unparsed),
        ] {
            assert_eq!(feature(sql), Some(want), "{sql}");
        }
    }

    #[test]
    fn tracked_sets_are_recorded_with_postgres_value_text() {
        let i = inspect("SET search_path TO app, \"$user\"; SET application_name = 'x y'");
        assert_eq!(i.feature, None);
        assert_eq!(
            i.changes,
            [
                SettingChange::Set("search_path".into(), "app, \"$user\"".into()),
                SettingChange::Set("application_name".into(), "x y".into()),
            ]
        );
        let i = inspect("SET TIME ZONE 'UTC'; SET statement_timeout = 5000; RESET DateStyle");
        assert_eq!(
            i.changes,
            [
                SettingChange::Set("timezone".into(), "UTC".into()),
                SettingChange::Set("statement_timeout".into(), "5000".into()),
                SettingChange::Reset("datestyle".into()),
            ]
        );
        assert_eq!(inspect("RESET ALL").changes, [SettingChange::ResetAll]);
        assert_eq!(
            inspect("SET application_name TO DEFAULT").changes,
            [SettingChange::Reset("application_name".into())]
        );
    }

    fn keyword(sql: &str) -> bool {
        prefilter(sql).keyword
    }

    #[test]
    fn whole_words_only() {
        assert!(keyword("a LISTEN b"));
        assert!(keyword("listen"));
        assert!(!keyword("listener"));
        assert!(!keyword("unlisten_x"));
        assert!(keyword("x;Reset y"));
        assert!(keyword("  SET x = 1"));
        assert!(keyword("select 1;\n set x = 1"));
        assert!(!keyword("UPDATE t SET x = 1"));
        assert!(!keyword("SELECT * FROM t OFFSET 1"));
        assert!(keyword("UPDATE t SET x = 1; /* */ SET y = 2"));
        assert!(keyword("UPDATE t SET x = 1 -- why"));
        assert!(!keyword(""));
        assert!(!keyword("se"));
        assert!(prefilter("select PG_ADVISORY_LOCK_shared(1)").advisory);
        assert!(prefilter("select 'x pg_try_advisory_lock'").advisory);
        assert!(!prefilter("select pg_advisory_xact_lock(1)").advisory);
    }

    /// The prefilter as it was first written (a scan per word); the one-pass version must
    /// agree with it on every text.
    mod reference {
        use super::super::{LEADING_WORDS, WORDS};

        pub fn prefilter(sql: &str) -> (bool, bool) {
            let advisory =
                contains_ci(sql, "pg_advisory_lock") || contains_ci(sql, "pg_try_advisory_lock");
            let keyword = WORDS.iter().any(|w| has_word(sql, w))
                || LEADING_WORDS.iter().any(|w| leads_statement(sql, w));
            (advisory, keyword)
        }

        fn contains_ci(hay: &str, needle: &str) -> bool {
            let (h, n) = (hay.as_bytes(), needle.as_bytes());
            h.len() >= n.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
        }

        fn has_word(hay: &str, word: &str) -> bool {
            word_positions(hay, word).next().is_some()
        }

        fn leads_statement(hay: &str, word: &str) -> bool {
            let h = hay.as_bytes();
            let commented = contains_ci(hay, "--") || contains_ci(hay, "/*");
            word_positions(hay, word).any(|i| {
                commented
                    || h[..i]
                        .iter()
                        .rev()
                        .find(|b| !b.is_ascii_whitespace())
                        .is_none_or(|&b| b == b';')
            })
        }

        fn word_positions<'a>(hay: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
            let (h, w) = (hay.as_bytes(), word.as_bytes());
            let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
            let end = (h.len() + 1).saturating_sub(w.len());
            (0..end).filter(move |&i| {
                h[i..i + w.len()].eq_ignore_ascii_case(w)
                    && (i == 0 || !ident(h[i - 1]))
                    && h.get(i + w.len()).is_none_or(|&b| !ident(b))
            })
        }
    }

    #[test]
    fn one_pass_prefilter_agrees_with_the_reference() {
        // Texts built from fragments that sit on every boundary the prefilter cares about.
        const PARTS: &[&str] = &[
            "SET",
            "set",
            "Reset",
            "listen",
            "LISTENER",
            "temp",
            "temporary",
            "declare",
            "prepare",
            "load",
            "discard",
            "pg_advisory_lock",
            "PG_TRY_ADVISORY_LOCK_SHARED",
            "pg_advisory_xact_lock",
            "x",
            "_",
            "$1",
            "é",
            ";",
            " ",
            "\n",
            "\t",
            "--",
            "/*",
            "*/",
            "-",
            "/",
            "(",
            ")",
            "'",
            "\"",
            ".",
            "1",
            "select",
            "update t",
            "offset",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 8) as usize;
            let sql: String = (0..n)
                .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
                .collect();
            let one = prefilter(&sql);
            assert_eq!(
                (one.advisory, one.keyword),
                reference::prefilter(&sql),
                "{sql:?}"
            );
        }
    }
}
