//! What a statement is, for the audit table: a normalized fingerprint (the same for every
//! execution of a query shape, whatever its literals), the tables it names and its type.
//!
//! Runs on the audit writer thread, never on the relay. Parsing costs microseconds, so results
//! are cached by the statement's shape (`shape`: the text with its literals replaced), so
//! `WHERE aid = 1` and `WHERE aid = 2` parse once. Texts without literals (prepared statements
//! with `$1`) are cached as they are and skip even the lexer.

use std::collections::HashMap;
use std::sync::Arc;

use super::shape::shape_of;

use pg_query::protobuf::summary_result::Context;

/// Distinct statement shapes (and literal-free texts) remembered, at most; the cache is
/// emptied when full, which only costs re-parsing.
const CACHE_CAPACITY: usize = 8192;
/// Longer texts are not cached (their key would hold the whole text).
const MAX_CACHED_TEXT: usize = 8192;

/// One statement of a Query string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatementSummary {
    /// libpg_query's fingerprint (16 hex digits): literals and whitespace do not change it.
    pub fingerprint: Option<String>,
    /// Tables the statement names: those it writes first, then those it reads, by name.
    pub tables: Vec<String>,
    /// The statement's first keyword, upper-cased (SELECT, INSERT, BEGIN, ...).
    pub keyword: Option<String>,
    /// Byte range of this statement within the Query string.
    pub range: std::ops::Range<usize>,
}

pub type Summaries = Arc<Vec<StatementSummary>>;

#[derive(Default)]
pub struct Summarizer {
    /// Literal-free texts, as they are.
    by_text: HashMap<Box<str>, Summaries>,
    /// Shapes of texts with literals. The statement ranges differ per text, so only
    /// single-statement shapes are cached here.
    by_shape: HashMap<String, Summaries>,
}

impl Summarizer {
    /// The statements of `sql`, summarized; one entry per statement (at least one).
    pub fn summarize(&mut self, sql: &str) -> Summaries {
        if let Some(hit) = self.by_text.get(sql) {
            return hit.clone();
        }
        let shape = match shape_of(sql) {
            Some(shape) => shape,
            // The lexer refused it (the server will have too): nothing to learn from it.
            None => return Arc::new(vec![unparsed(sql)]),
        };
        if shape.literals == 0 {
            let summaries = Arc::new(summarize_uncached(sql));
            if sql.len() <= MAX_CACHED_TEXT {
                bounded_insert(&mut self.by_text, sql.into(), summaries.clone());
            }
            return summaries;
        }
        if let Some(hit) = self.by_shape.get(&shape.key) {
            // Same shape, so same statements; only the range is this text's own.
            let mut one = hit[0].clone();
            one.range = 0..sql.len();
            return Arc::new(vec![one]);
        }
        let summaries = Arc::new(summarize_uncached(sql));
        if summaries.len() == 1 && shape.key.len() <= MAX_CACHED_TEXT {
            bounded_insert(&mut self.by_shape, shape.key, summaries.clone());
        }
        summaries
    }
}

fn bounded_insert<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Summaries>, k: K, v: Summaries) {
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    map.insert(k, v);
}

fn summarize_uncached(sql: &str) -> Vec<StatementSummary> {
    let pieces = match pg_query::split_with_scanner(sql) {
        Ok(pieces) if pieces.len() > 1 => pieces,
        _ => return vec![summarize_one(sql, 0..sql.len())],
    };
    pieces
        .into_iter()
        .map(|piece| {
            // `piece` borrows from `sql`: its offset is the pointer difference.
            let start = piece.as_ptr() as usize - sql.as_ptr() as usize;
            summarize_one(piece, start..start + piece.len())
        })
        .collect()
}

fn summarize_one(stmt: &str, range: std::ops::Range<usize>) -> StatementSummary {
    let fingerprint = pg_query::fingerprint(stmt, 0, 0).ok().map(|f| f.hex);
    let tables = match pg_query::summary(stmt, 0, -1) {
        Ok(summary) => {
            // Written tables (DML/DDL) first, as the statement's `table_name`; then by name,
            // so the order is stable (libpg_query reports a set).
            let mut tables: Vec<(bool, String)> = summary
                .tables
                .into_iter()
                .map(|t| (!matches!(t.context, Context::Dml | Context::Ddl), t.name))
                .collect();
            tables.sort();
            let mut seen: Vec<String> = Vec::with_capacity(tables.len());
            for (_, name) in tables {
                if !seen.contains(&name) {
                    seen.push(name);
                }
            }
            seen
        }
        Err(_) => Vec::new(),
    };
    StatementSummary {
        fingerprint,
        tables,
        keyword: first_keyword(stmt),
        range,
    }
}

fn unparsed(sql: &str) -> StatementSummary {
    StatementSummary {
        fingerprint: None,
        tables: Vec::new(),
        keyword: first_keyword(sql),
        range: 0..sql.len(),
    }
}

/// The first word of a statement, skipping whitespace, comments and parentheses.
fn first_keyword(stmt: &str) -> Option<String> {
    let mut rest = stmt.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after
                .split_once('\n')
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after
                .split_once("*/")
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else if let Some(after) = rest.strip_prefix('(') {
            rest = after.trim_start();
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .take(32)
        .collect();
    (!word.is_empty()).then(|| word.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_do_not_change_the_fingerprint_and_are_cached_by_shape() {
        let mut s = Summarizer::default();
        let a = s.summarize("SELECT abalance FROM pgbench_accounts WHERE aid = 17");
        let b = s.summarize("select abalance from pgbench_accounts where aid = 99123");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].fingerprint, b[0].fingerprint);
        assert!(a[0].fingerprint.as_deref().is_some_and(|f| f.len() == 16));
        assert_eq!(a[0].tables, vec!["pgbench_accounts".to_string()]);
        assert_eq!(a[0].keyword.as_deref(), Some("SELECT"));
        // Same shape modulo case is a different key, but a repeat of either is a hit.
        assert_eq!(s.by_shape.len(), 2);
        s.summarize("SELECT abalance FROM pgbench_accounts WHERE aid = 5");
        assert_eq!(s.by_shape.len(), 2);
        let other = s.summarize("SELECT * FROM customers WHERE id = 1");
        assert_ne!(other[0].fingerprint, a[0].fingerprint);
    }

    #[test]
    fn literal_free_texts_are_cached_as_they_are() {
        let mut s = Summarizer::default();
        let a = s.summarize("UPDATE orders SET total = $1 WHERE id = $2");
        assert_eq!(a[0].keyword.as_deref(), Some("UPDATE"));
        assert_eq!(a[0].tables, vec!["orders".to_string()]);
        assert_eq!(s.by_text.len(), 1);
        assert!(Arc::ptr_eq(
            &a,
            &s.summarize("UPDATE orders SET total = $1 WHERE id = $2")
        ));
    }

    #[test]
    fn multi_statement_strings_are_split() {
        let mut s = Summarizer::default();
        let sql = "INSERT INTO z SELECT * FROM a; SELECT * FROM c JOIN b ON true; COMMIT";
        let parts = s.summarize(sql);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].keyword.as_deref(), Some("INSERT"));
        assert_eq!(parts[0].tables, vec!["z".to_string(), "a".to_string()]);
        assert_eq!(parts[1].tables, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(parts[2].keyword.as_deref(), Some("COMMIT"));
        assert_eq!(
            &sql[parts[1].range.clone()].trim(),
            &"SELECT * FROM c JOIN b ON true"
        );
    }

    #[test]
    fn invalid_sql_still_gets_a_keyword() {
        let mut s = Summarizer::default();
        let bad = s.summarize("SELEC oops FROM");
        assert_eq!(bad[0].fingerprint, None);
        assert_eq!(bad[0].keyword.as_deref(), Some("SELEC"));
        assert_eq!(
            first_keyword("/* hi */ -- x\n (select 1)").as_deref(),
            Some("SELECT")
        );
    }
}
