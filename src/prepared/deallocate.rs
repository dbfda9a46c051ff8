//! Recognizes a simple Query that is exactly one `DEALLOCATE [PREPARE] name|ALL` or
//! `DISCARD ALL` (keywords only, no parser needed: the grammar is one line). Anything else,
//! including these inside a multi-statement Query or behind a comment, is not recognized and
//! goes to the server unchanged.

/// What a recognized statement drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    All,
    /// The statement name as PostgreSQL resolves it (unquoted: ASCII-lowercased).
    Name(Vec<u8>),
}

pub(super) fn parse(sql: &[u8]) -> Option<Target> {
    // Fast exit for the usual Query: the first non-blank byte decides.
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    if !matches!(sql[start], b'd' | b'D') {
        return None;
    }
    let mut words = Words {
        rest: trim_end(&sql[start..]),
    };
    let first = words.keyword()?;
    if first.eq_ignore_ascii_case(b"discard") {
        let all = words.keyword()?;
        return (all.eq_ignore_ascii_case(b"all") && words.rest.is_empty()).then_some(Target::All);
    }
    if !first.eq_ignore_ascii_case(b"deallocate") {
        return None;
    }
    let mut target = words.identifier()?;
    if let Ident::Bare(w) = &target {
        if w.eq_ignore_ascii_case(b"prepare") && !words.rest.is_empty() {
            target = words.identifier()?;
        }
    }
    if !words.rest.is_empty() {
        return None;
    }
    Some(match target {
        Ident::Bare(w) if w.eq_ignore_ascii_case(b"all") => Target::All,
        Ident::Bare(w) => Target::Name(w.to_ascii_lowercase()),
        Ident::Quoted(name) => Target::Name(name),
    })
}

/// Drops trailing blanks and one trailing `;`.
fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [head @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = head;
        } else {
            break;
        }
    }
    if let [head @ .., b';'] = s {
        s = head;
        while let [head @ .., last] = s {
            if !last.is_ascii_whitespace() {
                break;
            }
            s = head;
        }
    }
    s
}

enum Ident<'a> {
    Bare(&'a [u8]),
    Quoted(Vec<u8>),
}

struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    fn skip_blanks(&mut self) {
        let n = self
            .rest
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.rest.len());
        self.rest = &self.rest[n..];
    }

    /// An unquoted word: letters, digits, `_`, `$` and non-ASCII bytes.
    fn keyword(&mut self) -> Option<&'a [u8]> {
        self.skip_blanks();
        let first = *self.rest.first()?;
        if !(first.is_ascii_alphabetic() || first == b'_' || first >= 0x80) {
            return None;
        }
        let n = self
            .rest
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || *b >= 0x80))
            .unwrap_or(self.rest.len());
        let (word, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(word)
    }

    fn identifier(&mut self) -> Option<Ident<'a>> {
        self.skip_blanks();
        if self.rest.first() != Some(&b'"') {
            return self.keyword().map(Ident::Bare);
        }
        let mut name = Vec::new();
        let mut i = 1;
        loop {
            match (self.rest.get(i)?, self.rest.get(i + 1)) {
                (b'"', Some(b'"')) => {
                    name.push(b'"');
                    i += 2;
                }
                (b'"', _) => break,
                (&b, _) => {
                    name.push(b);
                    i += 1;
                }
            }
        }
        self.rest = &self.rest[i + 1..];
        Some(Ident::Quoted(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Option<Target> {
        Some(Target::Name(s.as_bytes().to_vec()))
    }

    #[test]
    fn recognizes_the_forms_postgres_accepts() {
        assert_eq!(parse(b"DEALLOCATE s1"), name("s1"));
        assert_eq!(parse(b"  deallocate prepare S1 ;  "), name("s1"));
        assert_eq!(
            parse(b"DEALLOCATE \"My \"\"Stmt\"\"\""),
            name("My \"Stmt\"")
        );
        assert_eq!(parse(b"DEALLOCATE ALL"), Some(Target::All));
        assert_eq!(parse(b"deallocate prepare all;"), Some(Target::All));
        assert_eq!(parse(b"DEALLOCATE \"all\""), name("all"));
        assert_eq!(parse(b"discard ALL"), Some(Target::All));
        // A statement literally named "prepare".
        assert_eq!(parse(b"DEALLOCATE prepare"), name("prepare"));
    }

    #[test]
    fn leaves_everything_else_alone() {
        for sql in [
            "SELECT 1",
            "DEALLOCATE",
            "DEALLOCATE s1; SELECT 1",
            "DEALLOCATE s1 s2",
            "DISCARD PLANS",
            "DISCARD ALL; SELECT 1",
            "DELETE FROM t",
            "DEALLOCATE \"unterminated",
            "",
        ] {
            assert_eq!(parse(sql.as_bytes()), None, "{sql}");
        }
    }
}
