//! Objects that reach tenant tables with someone else's rights: views (owner's rights unless
//! `security_invoker`), materialized views (no RLS at all), SECURITY DEFINER functions.

use super::catalog::{
    MATVIEW_OVER_TENANT_TABLE, SECURITY_DEFINER_FUNCTION, VIEW_NOT_SECURITY_INVOKER,
};
use super::signed::CONTEXT_FUNCTIONS;
use super::tables::TenantTable;
use super::{Ctx, DoctorError};

/// First server version (15) with `security_invoker` views.
const PG15: i32 = 150_000;

/// Views and materialized views that read tenant tables, directly or through other views,
/// and that the pool role can use. Returns how many there are.
pub(super) async fn views(ctx: &mut Ctx<'_>, tenant_tables: &[u32]) -> Result<usize, DoctorError> {
    let rows = ctx
        .query(
            "views over tenant tables",
            "WITH RECURSIVE reads(view_oid, table_oid) AS (
                 SELECT rw.ev_class, d.refobjid
                 FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid
                 WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                   AND d.refobjid = ANY ($2) AND rw.ev_class <> d.refobjid
               UNION
                 SELECT rw.ev_class, r.table_oid
                 FROM reads r
                 JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = r.view_oid
                                 AND d.classid = 'pg_rewrite'::regclass
                 JOIN pg_rewrite rw ON rw.oid = d.objid AND rw.ev_class <> r.view_oid
             )
             SELECT quote_ident(n.nspname) || '.' || quote_ident(v.relname), v.relkind::text,
                    coalesce(v.reloptions, '{}'), pg_get_userbyid(v.relowner)::text,
                    string_agg(DISTINCT quote_ident(tn.nspname) || '.' || quote_ident(t.relname), ', ')
             FROM reads r
             JOIN pg_class v ON v.oid = r.view_oid
             JOIN pg_namespace n ON n.oid = v.relnamespace
             JOIN pg_class t ON t.oid = r.table_oid
             JOIN pg_namespace tn ON tn.oid = t.relnamespace
             WHERE v.relkind IN ('v', 'm')
               AND (has_table_privilege($1::oid, v.oid, 'SELECT, INSERT, UPDATE, DELETE')
                    OR has_any_column_privilege($1::oid, v.oid, 'SELECT, INSERT, UPDATE'))
             GROUP BY v.oid, n.nspname, v.relname, v.relkind, v.reloptions, v.relowner
             ORDER BY 1",
            &[&ctx.role.oid, &tenant_tables],
        )
        .await?;
    let count = rows.len();
    for r in rows {
        let (name, kind, options, owner, reads): (String, String, Vec<String>, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if kind == "m" {
            let message = format!(
                "materialized view {name} (owner {owner}) holds rows of {reads} as of its last \
                 refresh, with no row-level security: {} reads every tenant's rows",
                ctx.role.name
            );
            let fix = Some(format!(
                "REVOKE ALL ON {name} FROM PUBLIC, {}; (or drop it)",
                ctx.role.ident
            ));
            ctx.report(&MATVIEW_OVER_TENANT_TABLE, Some(name), message, fix);
        } else if !security_invoker(&options) {
            let message = format!(
                "view {name} reads {reads} with the rights of its owner {owner}, not the \
                 caller's: policies are checked for {owner} (every row when {owner} is a \
                 superuser, has BYPASSRLS, or owns a table without FORCE)"
            );
            let fix = if ctx.role.version_num >= PG15 {
                format!("ALTER VIEW {name} SET (security_invoker = true);")
            } else {
                format!(
                    "PostgreSQL < 15 has no security_invoker: REVOKE ALL ON {name} FROM PUBLIC, {};",
                    ctx.role.ident
                )
            };
            ctx.report(&VIEW_NOT_SECURITY_INVOKER, Some(name), message, Some(fix));
        }
    }
    Ok(count)
}

/// `security_invoker` in `reloptions` (`name=value`, value as written: PostgreSQL's boolean
/// spellings).
fn security_invoker(options: &[String]) -> bool {
    options.iter().any(|o| {
        o.split_once('=').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("security_invoker") && parse_pg_bool(v) == Some(true)
        })
    })
}

/// PostgreSQL's `parse_bool`: unique prefixes of true/false/yes/no, on/off, 1/0.
fn parse_pg_bool(v: &str) -> Option<bool> {
    let v = v.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || v == "on" || v == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

/// SECURITY DEFINER functions the pool role may execute that run as a superuser, a
/// BYPASSRLS role, or an owner of a tenant table: each one is a door around RLS to review.
/// The signed context's own functions are expected and checked elsewhere.
pub(super) async fn security_definer_functions(
    ctx: &mut Ctx<'_>,
    tables: &[TenantTable],
) -> Result<(), DoctorError> {
    let owners: Vec<u32> = tables.iter().map(|t| t.owner_oid).collect();
    let rows = ctx
        .query(
            "SECURITY DEFINER functions",
            "SELECT f.oid::regprocedure::text, n.nspname::text, f.proname::text,
                    pg_get_userbyid(f.proowner)::text, o.rolsuper, o.rolbypassrls,
                    coalesce(f.proconfig, '{}')
             FROM pg_proc f
             JOIN pg_namespace n ON n.oid = f.pronamespace
             JOIN pg_roles o ON o.oid = f.proowner
             WHERE f.prosecdef
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND has_function_privilege($1::oid, f.oid, 'EXECUTE')
               AND (o.rolsuper OR o.rolbypassrls OR f.proowner = ANY ($2))
             ORDER BY 1",
            &[&ctx.role.oid, &owners],
        )
        .await?;
    for r in rows {
        let (function, schema, name, owner, superuser, bypassrls, config): (
            String,
            String,
            String,
            String,
            bool,
            bool,
            Vec<String>,
        ) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        if ctx.opts.signed_schema.as_deref() == Some(schema.as_str())
            && CONTEXT_FUNCTIONS.contains(&name.as_str())
        {
            continue;
        }
        let who = if superuser {
            "a superuser"
        } else if bypassrls {
            "a BYPASSRLS role"
        } else {
            "an owner of tenant tables"
        };
        let path = if config.iter().any(|c| c.starts_with("search_path=")) {
            ""
        } else {
            "; it has no fixed search_path"
        };
        let message = format!(
            "{} may execute SECURITY DEFINER {function}, which runs as {owner} ({who}){path}: \
             review that it filters by tenant",
            ctx.role.name
        );
        let fix = Some(format!(
            "REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC, {}; if tenants need it, make it \
             SECURITY INVOKER or filter by tenant inside, with SET search_path = pg_catalog, pg_temp",
            ctx.role.ident
        ));
        ctx.report(&SECURITY_DEFINER_FUNCTION, Some(function), message, fix);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloption_booleans() {
        let opts = |s: &str| vec![s.to_owned()];
        assert!(security_invoker(&opts("security_invoker=true")));
        assert!(security_invoker(&opts("security_invoker=on")));
        assert!(security_invoker(&opts("security_invoker=1")));
        assert!(security_invoker(&opts("security_invoker=YES")));
        assert!(!security_invoker(&opts("security_invoker=false")));
        assert!(!security_invoker(&opts("security_invoker=off")));
        assert!(!security_invoker(&opts("security_barrier=true")));
        assert!(!security_invoker(&[]));
        assert_eq!(parse_pg_bool("o"), None);
    }
}
