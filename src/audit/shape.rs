//! Statement shapes: the cache key of `summary`, the text with its literals replaced.
//!
//! Two texts with the same shape differ only in literal values and whitespace, so they have
//! the same fingerprint and tables. The common case (plain ASCII SQL: identifiers, numbers,
//! simple strings, `$n` parameters, operators) is shaped by a small lexer here, because
//! libpg_query's scanner costs microseconds per statement (it builds and decodes a protobuf
//! of every token) and simple-protocol clients send a new text for every execution. Anything
//! less plain (comments, dollar quotes, escape strings, backslashes, non-ASCII) goes to
//! PostgreSQL's own lexer through libpg_query. The two kinds of keys are prefixed differently,
//! so they can never be equal by accident.

use pg_query::protobuf::Token;

pub struct Shape {
    pub key: String,
    /// Literals replaced; 0 means the text is its own shape.
    pub literals: usize,
}

/// The shape of `sql`; `None` when even PostgreSQL's lexer refuses it.
pub fn shape_of(sql: &str) -> Option<Shape> {
    plain_shape(sql).or_else(|| lexer_shape(sql))
}

/// Placeholders: not ASCII, so no token of a plain text can look like one (and PostgreSQL
/// tokens of other texts are text, never this marker alone).
const NUMBER: &str = "§n";
const STRING: &str = "§s";
const LITERAL: &str = "§";

/// Characters that form operators; a run of them is one token (so `>=` and `> =` differ).
fn is_operator(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?:".contains(&b)
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// The fast lexer; `None` for anything it does not handle exactly.
fn plain_shape(sql: &str) -> Option<Shape> {
    let s = sql.as_bytes();
    let mut key = String::with_capacity(sql.len() + 2);
    key.push_str("f:");
    let mut literals = 0;
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        // Non-ASCII stays out, which also keeps the placeholders (`§`) out of the key's tokens.
        if !b.is_ascii() || b == b'\\' || (b.is_ascii_control() && !b.is_ascii_whitespace()) {
            return None;
        }
        if b.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let placeholder = if is_ident_start(b) {
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            // E'..', B'..', X'..', N'..', U&'..': prefixed literals with their own rules.
            if matches!(s.get(i), Some(b'\'' | b'&')) {
                return None;
            }
            None
        } else if b.is_ascii_digit() || (b == b'.' && s.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            i = number_end(s, i);
            // `1abc`, `0x1F`, `1_000`: leave the edge cases to PostgreSQL's lexer.
            if s.get(i).is_some_and(|c| is_ident_char(*c) || *c == b'.') {
                return None;
            }
            Some(NUMBER)
        } else if b == b'\'' {
            i = quoted_end(s, i, b'\'')?;
            Some(STRING)
        } else if b == b'"' {
            i = quoted_end(s, i, b'"')?;
            None
        } else if b == b'$' {
            i += 1;
            let digits = i;
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            // `$$`/`$tag$` dollar quoting is not plain.
            if i == digits || s.get(i).is_some_and(|c| is_ident_char(*c)) {
                return None;
            }
            None
        } else if is_operator(b) {
            // `--` and `/*` start comments.
            if s[i..].starts_with(b"--") || s[i..].starts_with(b"/*") {
                return None;
            }
            while i < s.len() && is_operator(s[i]) {
                if s[i..].starts_with(b"--") || s[i..].starts_with(b"/*") {
                    return None;
                }
                i += 1;
            }
            None
        } else {
            // ( ) , ; [ ] . and the like: one token each.
            i += 1;
            None
        };
        key.push(' ');
        match placeholder {
            Some(p) => {
                literals += 1;
                key.push_str(p);
            }
            None => key.push_str(&sql[start..i]),
        }
    }
    Some(Shape { key, literals })
}

/// End of a number starting at `i`: digits, an optional fraction, an optional exponent.
fn number_end(s: &[u8], mut i: usize) -> usize {
    let digits = |s: &[u8], mut i: usize| {
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    i = digits(s, i);
    if s.get(i) == Some(&b'.') && s.get(i + 1) != Some(&b'.') {
        i = digits(s, i + 1);
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(s.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if s.get(j).is_some_and(u8::is_ascii_digit) {
            i = digits(s, j);
        }
    }
    i
}

/// End (exclusive) of a quoted token starting at `i`, where a doubled quote is an escaped one.
/// `None` when it is not terminated.
fn quoted_end(s: &[u8], i: usize, quote: u8) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match s.get(j)? {
            q if *q == quote => {
                if s.get(j + 1) == Some(&quote) {
                    j += 2;
                } else {
                    return Some(j + 1);
                }
            }
            _ => j += 1,
        }
    }
}

/// PostgreSQL's own lexer (libpg_query): literals replaced by a placeholder.
fn lexer_shape(sql: &str) -> Option<Shape> {
    let scanned = pg_query::scan(sql).ok()?;
    let mut key = String::with_capacity(sql.len() + 2);
    key.push_str("s:");
    let mut literals = 0;
    for t in &scanned.tokens {
        let literal = matches!(
            Token::try_from(t.token),
            Ok(Token::Iconst
                | Token::Fconst
                | Token::Sconst
                | Token::Usconst
                | Token::Bconst
                | Token::Xconst)
        );
        key.push(' ');
        if literal {
            literals += 1;
            key.push_str(LITERAL);
        } else {
            key.push_str(sql.get(t.start as usize..t.end as usize)?);
        }
    }
    Some(Shape { key, literals })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> String {
        shape_of(sql).unwrap().key
    }

    #[test]
    fn literals_and_whitespace_do_not_change_the_shape() {
        assert_eq!(
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 17;"),
            key("SELECT  abalance\nFROM pgbench_accounts WHERE aid=99123 ;")
        );
        assert_eq!(key("SELECT 'it''s', 1.5e3"), key("SELECT 'x', 2"));
        assert_eq!(shape_of("SELECT 'a', 1, $1").unwrap().literals, 2);
        assert_eq!(shape_of("SELECT $1").unwrap().literals, 0);
        // Inside a string anything goes; it is replaced whole.
        assert_eq!(key("SELECT 'ünïcode'"), key("SELECT 'plain'"));
    }

    #[test]
    fn different_statements_have_different_shapes() {
        let distinct = [
            "SELECT a FROM t WHERE x >= 1",
            "SELECT a FROM t WHERE x > = 1",
            "SELECT a FROM t WHERE x = 1",
            "SELECT a FROM u WHERE x = 1",
            "SELECT ab FROM t WHERE x = 1",
            "SELECT a b FROM t WHERE x = 1",
            "SELECT \"a b\" FROM t WHERE x = 1",
            "SELECT a FROM t WHERE x = '1'",
            "SELECT a FROM t WHERE x = $1",
            "SELECT a FROM t WHERE x = $2",
            "SELECT a::int FROM t",
            "SELECT a: :int FROM t",
            "SELECT a # 1",
            "SELECT a 1 1",
        ];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                assert_ne!(key(a), key(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn unusual_text_goes_to_postgres_lexer() {
        for sql in [
            "SELECT 1 -- comment",
            "SELECT /* c */ 1",
            "SELECT E'a\\nb'",
            "SELECT $$body$$",
            "SELECT U&'d\\0061t'",
            "SELECT ünï FROM t",
            "SELECT x'1F'",
            "SELECT 1abc",
        ] {
            assert!(plain_shape(sql).is_none(), "{sql}");
            if let Some(shape) = shape_of(sql) {
                assert!(shape.key.starts_with("s:"), "{sql}");
            }
        }
        // Unterminated quotes: the lexer decides (it refuses).
        assert!(plain_shape("SELECT 'open").is_none());
        assert!(shape_of("SELECT 'open").is_none());
    }
}
