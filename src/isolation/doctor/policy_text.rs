//! Reading policy and constraint text: does an expression compare the tenant column with
//! the tenant context, does a CHECK exclude ''. Heuristics over `pg_get_expr` /
//! `pg_get_constraintdef` output (printed with `search_path = pg_catalog`, so every user
//! function is schema-qualified); the probe backs them with observed behaviour.

use super::{Ctx, DoctorError};

/// `pg_policy.polcmd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Command {
    Select,
    Insert,
    Update,
    Delete,
    All,
}

impl Command {
    /// From `polcmd::text`: `r`, `a`, `w`, `d` or `*`. Unknown letters count as `All`, the
    /// reading under which a non-scoped policy is most dangerous.
    pub fn from_polcmd(c: &str) -> Command {
        match c {
            "r" => Command::Select,
            "a" => Command::Insert,
            "w" => Command::Update,
            "d" => Command::Delete,
            _ => Command::All,
        }
    }

    /// The single commands this covers.
    pub fn expand(self) -> Vec<Command> {
        match self {
            Command::All => vec![
                Command::Select,
                Command::Insert,
                Command::Update,
                Command::Delete,
            ],
            c => vec![c],
        }
    }

    pub fn sql(self) -> &'static str {
        match self {
            Command::Select => "SELECT",
            Command::Insert => "INSERT",
            Command::Update => "UPDATE",
            Command::Delete => "DELETE",
            Command::All => "ALL",
        }
    }
}

/// Where the tenant comes from, and how policies refer to it.
#[derive(Debug, Clone)]
pub(super) struct TenantContext {
    /// What fix suggestions compare the tenant column with.
    expr_sql: String,
    /// Lower-case fragments; a policy expression containing one refers to the context.
    patterns: Vec<String>,
    /// `current_setting('<setting>'`, lower case: the plain setting.
    setting_pattern: String,
    signed: bool,
}

impl TenantContext {
    /// Plain-setting mode: `current_setting('<setting>'`, or a function whose source calls it.
    pub fn setting(setting: &str, wrappers: &[String]) -> TenantContext {
        let setting_pattern = format!("current_setting('{}'", setting.to_lowercase());
        let mut patterns = vec![setting_pattern.clone()];
        patterns.extend(wrappers.iter().map(|w| format!("{}(", w.to_lowercase())));
        TenantContext {
            expr_sql: format!("current_setting({}, true)", literal(setting)),
            patterns,
            setting_pattern,
            signed: false,
        }
    }

    /// Signed mode: `<schema>.current_tenant()`, or a function whose source calls it.
    /// `schema_ident` is `quote_ident(schema)`.
    pub fn signed(schema_ident: &str, setting: &str, wrappers: &[String]) -> TenantContext {
        let mut patterns = vec![format!("{}.current_tenant(", schema_ident.to_lowercase())];
        patterns.extend(wrappers.iter().map(|w| format!("{}(", w.to_lowercase())));
        TenantContext {
            expr_sql: format!("(SELECT {schema_ident}.current_tenant())"),
            patterns,
            setting_pattern: format!("current_setting('{}'", setting.to_lowercase()),
            signed: true,
        }
    }

    /// Loads the wrapper functions for `ctx`'s mode from `pg_proc`.
    pub async fn load(ctx: &Ctx<'_>) -> Result<TenantContext, DoctorError> {
        let schema_ident = match &ctx.opts.signed_schema {
            Some(schema) => {
                let rows = ctx
                    .query("schema name", "SELECT quote_ident($1)", &[schema])
                    .await?;
                Some(
                    rows.first()
                        .map(|r| r.get::<_, String>(0))
                        .unwrap_or_default(),
                )
            }
            None => None,
        };
        // Source fragments a wrapper must contain (both, lower case).
        let (call, argument) = match &schema_ident {
            Some(s) => {
                let call = format!("{}.current_tenant(", s.to_lowercase());
                (call.clone(), call)
            }
            None => (
                "current_setting".to_owned(),
                format!("'{}'", ctx.tenant_setting.to_lowercase()),
            ),
        };
        let rows = ctx
            .query(
                "tenant context functions",
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND strpos(lower(p.prosrc), $1) > 0 AND strpos(lower(p.prosrc), $2) > 0
                 ORDER BY 1",
                &[&call, &argument],
            )
            .await?;
        let wrappers: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(match schema_ident {
            Some(s) => TenantContext::signed(&s, ctx.tenant_setting, &wrappers),
            None => TenantContext::setting(ctx.tenant_setting, &wrappers),
        })
    }

    /// For messages: the context as SQL.
    pub fn describe(&self) -> &str {
        &self.expr_sql
    }

    /// In signed mode, a note when `expr` reads the plain setting instead.
    pub fn plain_setting_note(&self, expr: &str) -> &'static str {
        if self.signed && expr.to_lowercase().contains(&self.setting_pattern) {
            " (it reads the plain setting, which any client can SET)"
        } else {
            ""
        }
    }

    fn refers_to(&self, expr: &str) -> bool {
        let lower = expr.to_lowercase();
        self.patterns.iter().any(|p| lower.contains(p))
    }

    /// `CREATE POLICY` for a table (fix suggestion).
    pub fn policy_sql(&self, name: &str, table: &str, column: &str) -> String {
        let cond = format!("{column} = {}", self.expr_sql);
        format!("CREATE POLICY {name} ON {table} USING ({cond}) WITH CHECK ({cond});")
    }

    /// `ALTER POLICY` with the clauses `cmd` allows (fix suggestion).
    pub fn alter_policy_sql(
        &self,
        policy: &str,
        table: &str,
        column: &str,
        cmd: Command,
    ) -> String {
        let cond = format!("{column} = {}", self.expr_sql);
        let clauses = match cmd {
            Command::Select | Command::Delete => format!("USING ({cond})"),
            Command::Insert => format!("WITH CHECK ({cond})"),
            Command::Update | Command::All => format!("USING ({cond}) WITH CHECK ({cond})"),
        };
        format!("ALTER POLICY {policy} ON {table} {clauses};")
    }
}

/// Whether a policy expression mentions the table's own tenant column (`column` as
/// `quote_ident` gives it; not a qualified `x.column` of a subquery) and the tenant context.
pub(super) fn is_tenant_scoped(expr: &str, column: &str, ctx: &TenantContext) -> bool {
    has_ident(expr, column) && ctx.refers_to(expr)
}

/// Whether a CHECK constraint definition (on the column, or on its domain as `VALUE`) rules
/// out the empty string: `<> ''`, `length(..) > 0`, or a regular expression that does not
/// match ''.
pub(super) fn excludes_empty(def: &str, column: &str) -> bool {
    if !has_ident(def, column) && !has_ident(def, "VALUE") {
        return false;
    }
    let lower = def.to_lowercase();
    if lower.contains("<> ''") {
        return true;
    }
    if lower.contains("length(") && (lower.contains(") > 0") || lower.contains(") >= 1")) {
        return true;
    }
    regex_literal(def)
        .is_some_and(|pattern| regex::Regex::new(&pattern).is_ok_and(|re| !re.is_match("")))
}

/// The pattern of the first ` ~ '<pattern>'` in a constraint definition.
fn regex_literal(def: &str) -> Option<String> {
    let start = def.find(" ~ '")? + 4;
    let mut out = String::new();
    let mut chars = def[start..].chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return Some(out);
        }
        out.push(c);
    }
    None
}

/// `ident` occurs in `text` as a whole identifier that is not qualified (`x.ident`).
pub(super) fn has_ident(text: &str, ident: &str) -> bool {
    let continues = |c: char| c.is_alphanumeric() || c == '_' || c == '$' || c == '"';
    text.match_indices(ident).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + ident.len()..].chars().next();
        !before.is_some_and(|c| continues(c) || c == '.') && !after.is_some_and(continues)
    })
}

/// A SQL string literal (standard_conforming_strings on).
pub(super) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting() -> TenantContext {
        TenantContext::setting(
            "app.current_tenant_id",
            &["public.current_tenant_id".to_owned()],
        )
    }

    #[test]
    fn scoped_expressions() {
        let s = setting();
        let col = "tenant_id";
        assert!(is_tenant_scoped(
            "(tenant_id = current_setting('app.current_tenant_id'::text, true))",
            col,
            &s
        ));
        assert!(is_tenant_scoped(
            "(tenant_id = public.current_tenant_id())",
            col,
            &s
        ));
        assert!(!is_tenant_scoped("true", col, &s));
        assert!(!is_tenant_scoped(
            "(owner_tenant_id = current_setting('app.current_tenant_id'::text, true))",
            col,
            &s
        ));
        assert!(!is_tenant_scoped(
            "(EXISTS ( SELECT 1 FROM public.m WHERE (m.tenant_id = current_setting('app.current_tenant_id'::text, true))))",
            col,
            &s
        ));
        assert!(!is_tenant_scoped(
            "(tenant_id = current_setting('app.other'::text, true))",
            col,
            &s
        ));
        let signed = TenantContext::signed("pgtenant", "app.current_tenant_id", &[]);
        assert!(is_tenant_scoped(
            "(tenant_id = ( SELECT pgtenant.current_tenant() AS current_tenant))",
            col,
            &signed
        ));
        let plain = "(tenant_id = current_setting('app.current_tenant_id'::text, true))";
        assert!(!is_tenant_scoped(plain, col, &signed));
        assert!(!signed.plain_setting_note(plain).is_empty());
        assert!(is_tenant_scoped(
            "(\"Tenant\" = current_setting('app.current_tenant_id'::text, true))",
            "\"Tenant\"",
            &s
        ));
    }

    #[test]
    fn empty_exclusion() {
        assert!(excludes_empty(
            "CHECK ((tenant_id <> ''::text))",
            "tenant_id"
        ));
        assert!(excludes_empty(
            "CHECK (((tenant_id)::text <> ''::text))",
            "tenant_id"
        ));
        assert!(excludes_empty("CHECK ((VALUE <> ''::text))", "tenant_id"));
        assert!(excludes_empty(
            "CHECK ((length(tenant_id) > 0))",
            "tenant_id"
        ));
        assert!(excludes_empty(
            "CHECK ((tenant_id ~ '^[a-z0-9-]+$'::text))",
            "tenant_id"
        ));
        assert!(!excludes_empty(
            "CHECK ((tenant_id ~ '^.*$'::text))",
            "tenant_id"
        ));
        assert!(!excludes_empty("CHECK ((name <> ''::text))", "tenant_id"));
        assert!(!excludes_empty("CHECK ((amount_cents >= 0))", "tenant_id"));
    }

    #[test]
    fn fix_sql_follows_the_command() {
        let s = setting();
        assert_eq!(
            s.alter_policy_sql("p", "public.t", "tenant_id", Command::Insert),
            "ALTER POLICY p ON public.t WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));"
        );
        assert!(s
            .alter_policy_sql("p", "public.t", "tenant_id", Command::Select)
            .ends_with("USING (tenant_id = current_setting('app.current_tenant_id', true));"));
        assert_eq!(Command::from_polcmd("*").expand().len(), 4);
    }

    #[test]
    fn identifiers_are_whole_words() {
        assert!(has_ident("(tenant_id = x)", "tenant_id"));
        assert!(!has_ident("(xtenant_id = x)", "tenant_id"));
        assert!(!has_ident("(tenant_id2 = x)", "tenant_id"));
        assert!(!has_ident("(c.tenant_id = x)", "tenant_id"));
        assert!(has_ident("((tenant_id)::text = x)", "tenant_id"));
    }
}
