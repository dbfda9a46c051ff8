//! A lexical pre-check: when it says a text is clean, no parse of it can contain anything
//! the guard blocks, so the parse can be skipped.
//!
//! Why that holds. Every rule needs a keyword or a name in the text:
//! - `SET`/`RESET` statements (tenant setting, `RESET ALL`, role, session authorization,
//!   client encoding, `standard_conforming_strings`, also inside `ALTER ... SET` and a
//!   function's `SET` clause) need the keyword `SET` or `RESET`; `DISCARD`, `DO`, `LISTEN`,
//!   `ALTER` (role), `FUNCTION`/`PROCEDURE`, `COPY ... PROGRAM` need theirs. Keywords cannot
//!   be quoted or escaped: a quoted word is an identifier.
//! - Function names (`set_config`, the dynamic-SQL functions) and `pg_settings` are
//!   identifiers, written plain (case-folded), double-quoted (verbatim) or `U&"..."`
//!   (Unicode escapes). A text containing `u&` always goes to the parser.
//! - A function named by a string literal (which could use `E'\163...'` escapes) is only
//!   possible in `CREATE AGGREGATE`/`CREATE OPERATOR` definitions: those keywords are listed.
//!
//! The text is cut into runs of ASCII letters and `_` (case-insensitive); everything else,
//! digits included, separates runs. PostgreSQL's lexer ends an identifier or keyword only
//! at a character that is not a letter, digit, `_`, `$` or a byte >= 0x80, so every keyword
//! or identifier token above is exactly one run here (separating at more characters than the
//! lexer only makes extra runs, which can only cause an unnecessary parse). Words inside
//! comments and string literals also count: harmless false alarms.

/// Runs that send a text to the parser. Lowercase.
const WORDS: &[&str] = &[
    "set",
    "reset",
    "discard",
    "do",
    "alter",
    "function",
    "procedure",
    "aggregate",
    "operator",
    "listen",
    "program",
    "set_config",
    "pg_settings",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "crosstab", // crosstab2..4 too: digits separate runs
    "connectby",
    "xpath_table",
];

/// True when `sql` may contain a statement the guard blocks (so it must be parsed); false
/// only when that is impossible.
pub(super) fn may_match(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    if bytes
        .windows(2)
        .any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&')
    {
        return true;
    }
    bytes
        .split(|b| !(b.is_ascii_alphabetic() || *b == b'_'))
        .any(is_word)
}

fn is_word(run: &[u8]) -> bool {
    WORDS.iter().any(|w| run.eq_ignore_ascii_case(w.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_texts_skip_the_parser() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            "SELECT current_setting('app.current_tenant_id')",
            "SHOW app.current_tenant_id",
            "BEGIN; SELECT 1; COMMIT",
            "select dataset, offset_ms from t1 order by 1 offset 5",
            "SELECT set_configuration FROM t",
        ] {
            assert!(!may_match(sql), "{sql}");
        }
    }

    #[test]
    fn keywords_and_names_are_found_in_any_case_and_quoting() {
        for sql in [
            "SET app.x = 1",
            "reset ALL",
            "UPDATE t SET a = 1",
            "SELECT \"SET_CONFIG\"('a','b',false)",
            "SELECT pg_catalog.set_config('a','b',false)",
            "select 1;DO$x$ begin end $x$",
            "SELECT 1/*c*/;/*c*/DO 'x'",
            "SELECT u&\"\\0073et_config\"('a','b',false)",
            "SELECT U&\"d!0061t\" UESCAPE '!'",
            "CREATE AGGREGATE a(text) (sfunc = E'\\164s_rewrite', stype = tsquery)",
            "UPDATE pg_catalog.pg_settings SET setting = 'x'",
            "SELECT * FROM ts_stat('select 1')",
            "COPY t TO PROGRAM 'x'",
            "select 1 as x2do", // a digit separates: an extra parse, never a missed one
        ] {
            assert!(may_match(sql), "{sql}");
        }
    }
}
