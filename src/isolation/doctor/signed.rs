//! Checks of the signed tenant context (design/isolation.md, "The tenant context the client
//! cannot write"): the schema and its three functions exist, are SECURITY DEFINER with a
//! fixed search_path and executable by the pool role; the pool role can touch none of its
//! tables; the role the functions run as can read the key table and inherits
//! `pg_read_all_stats`; proofs (bind parameters) are not written to the server log.

use super::catalog::{
    SIGNED_FUNCTION_MISSING, SIGNED_FUNCTION_NOT_DEFINER, SIGNED_FUNCTION_NOT_EXECUTABLE,
    SIGNED_KEYS_READABLE, SIGNED_KEYS_TABLE_MISSING, SIGNED_OWNER_CANNOT_READ_KEYS,
    SIGNED_OWNER_LACKS_READ_ALL_STATS, SIGNED_PROOFS_LOGGED, SIGNED_SCHEMA_MISSING,
    SIGNED_TABLE_ACCESSIBLE,
};
use super::{Ctx, DoctorError};

/// The functions the pool role calls; nothing else in the schema is for it.
pub(super) const CONTEXT_FUNCTIONS: [&str; 3] = ["enter", "current_tenant", "leave"];

/// A table of the schema is the key table when its name contains this.
const KEY_TABLE_MARK: &str = "key";

pub(super) async fn check(ctx: &mut Ctx<'_>, schema: &str) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "signed schema",
            "SELECT n.oid, quote_ident(n.nspname), n.nspowner FROM pg_namespace n WHERE n.nspname = $1",
            &[&schema],
        )
        .await?;
    let Some(row) = rows.first() else {
        ctx.report(
            &SIGNED_SCHEMA_MISSING,
            Some(schema.to_owned()),
            format!(
                "schema {schema} does not exist: the signed tenant context is not installed, \
                 so no session can enter a tenant"
            ),
            Some(
                "install the signed-context schema (pgtenant's setup SQL) as its NOLOGIN owner"
                    .into(),
            ),
        );
        return Ok(());
    };
    let (schema_oid, schema_ident, schema_owner): (u32, String, u32) =
        (row.get(0), row.get(1), row.get(2));
    let definer = functions(ctx, schema, schema_oid, &schema_ident)
        .await?
        .unwrap_or(schema_owner);
    let key_tables = tables(ctx, schema, schema_oid).await?;
    owner(ctx, definer, &key_tables).await?;
    logging(ctx).await
}

/// Returns the owner of `enter()` (the role proofs are verified as), if it exists.
async fn functions(
    ctx: &mut Ctx<'_>,
    schema: &str,
    schema_oid: u32,
    schema_ident: &str,
) -> Result<Option<u32>, DoctorError> {
    let rows = ctx
        .query(
            "signed functions",
            "SELECT f.proname::text, f.oid::regprocedure::text, f.prosecdef,
                    coalesce(f.proconfig, '{}'), f.proowner,
                    has_function_privilege($1::oid, f.oid, 'EXECUTE')
             FROM pg_proc f
             WHERE f.pronamespace = $2 AND f.proname = ANY ($3)
             ORDER BY 1, 2",
            &[&ctx.role.oid, &schema_oid, &CONTEXT_FUNCTIONS.as_slice()],
        )
        .await?;
    let mut definer = None;
    for name in CONTEXT_FUNCTIONS {
        let found: Vec<_> = rows
            .iter()
            .filter(|r| r.get::<_, String>(0) == name)
            .collect();
        if found.is_empty() {
            ctx.report(
                &SIGNED_FUNCTION_MISSING,
                Some(format!("{schema_ident}.{name}")),
                format!("{schema_ident}.{name}() does not exist in schema {schema}"),
                Some("reinstall the signed-context schema".into()),
            );
        }
        for r in found {
            let (function, definer_fn, config, owner, executable): (
                String,
                bool,
                Vec<String>,
                u32,
                bool,
            ) = (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            if name == "enter" && definer.is_none() {
                definer = Some(owner);
            }
            if !executable {
                let message = format!(
                    "{} cannot execute {function}: every pin fails (closed, but an outage)",
                    ctx.role.name
                );
                let fix = Some(format!(
                    "GRANT EXECUTE ON FUNCTION {function} TO {};",
                    ctx.role.ident
                ));
                ctx.report(
                    &SIGNED_FUNCTION_NOT_EXECUTABLE,
                    Some(function.clone()),
                    message,
                    fix,
                );
            }
            let fixed_path = config.iter().any(|c| c.starts_with("search_path="));
            if !definer_fn || !fixed_path {
                let problem = if definer_fn {
                    "has no fixed search_path: objects earlier in the caller's path (temporary \
                     tables, a schema the caller can create in) replace what it reads"
                } else {
                    "is not SECURITY DEFINER: it runs with the caller's rights, so either it \
                     fails or the pool role can read and write the context itself"
                };
                ctx.report(
                    &SIGNED_FUNCTION_NOT_DEFINER,
                    Some(function.clone()),
                    format!("{function} {problem}"),
                    Some(format!(
                        "ALTER FUNCTION {function} SECURITY DEFINER SET search_path = pg_catalog, pg_temp;"
                    )),
                );
            }
        }
    }
    Ok(definer)
}

/// Reports what the pool role can touch in the schema; returns the key tables (oid, name).
async fn tables(
    ctx: &mut Ctx<'_>,
    schema: &str,
    schema_oid: u32,
) -> Result<Vec<(u32, String)>, DoctorError> {
    let rows = ctx
        .query(
            "signed tables",
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relname::text,
                    has_table_privilege($1::oid, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
                      OR has_any_column_privilege($1::oid, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relnamespace = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
             ORDER BY 2",
            &[&ctx.role.oid, &schema_oid],
        )
        .await?;
    let mut keys = Vec::new();
    for r in rows {
        let (oid, name, bare, accessible): (u32, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let is_key = bare.to_lowercase().contains(KEY_TABLE_MARK);
        if is_key {
            keys.push((oid, name.clone()));
        }
        if !accessible {
            continue;
        }
        let (check, what) = if is_key {
            (
                &SIGNED_KEYS_READABLE,
                "the HMAC keys: any tenant can forge a proof for any tenant",
            )
        } else {
            (
                &SIGNED_TABLE_ACCESSIBLE,
                "signed-context state: the pool role must reach it only through enter/current_tenant/leave",
            )
        };
        let message = format!("{} has privileges on {name}, {what}", ctx.role.name);
        let fix = Some(format!(
            "REVOKE ALL ON {name} FROM PUBLIC, {};",
            ctx.role.ident
        ));
        ctx.report(check, Some(name), message, fix);
    }
    if keys.is_empty() {
        ctx.report(
            &SIGNED_KEYS_TABLE_MISSING,
            Some(schema.to_owned()),
            format!(
                "schema {schema} has no table whose name contains \"{KEY_TABLE_MARK}\": enter() \
                 has no keys to verify proofs with"
            ),
            Some("reinstall the signed-context schema".into()),
        );
    }
    Ok(keys)
}

/// The role `enter()` runs as: reads the key table, sees the caller's backend start time.
/// Evaluated on the admin connection when there is one.
async fn owner(
    ctx: &mut Ctx<'_>,
    definer: u32,
    key_tables: &[(u32, String)],
) -> Result<(), DoctorError> {
    let rows = ctx
        .query_privileged(
            "signed owner",
            "SELECT r.rolname::text, quote_ident(r.rolname), r.rolsuper,
                    pg_has_role(r.oid, 'pg_read_all_stats', 'USAGE')
             FROM pg_roles r WHERE r.oid = $1",
            &[&definer],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(());
    };
    let (owner, owner_ident, superuser, read_all_stats): (String, String, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    for (oid, table) in key_tables {
        let rows = ctx
            .query_privileged(
                "signed key table privileges",
                "SELECT has_table_privilege($1::oid, $2::oid, 'SELECT')",
                &[&definer, oid],
            )
            .await?;
        if rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
            continue;
        }
        ctx.report(
            &SIGNED_OWNER_CANNOT_READ_KEYS,
            Some(table.clone()),
            format!(
                "{owner}, the role enter() runs as, cannot SELECT {table}: every proof fails \
                 (closed, but an outage)"
            ),
            Some(format!("GRANT SELECT ON {table} TO {owner_ident};")),
        );
    }
    if !superuser && !read_all_stats {
        ctx.report(
            &SIGNED_OWNER_LACKS_READ_ALL_STATS,
            Some(owner.clone()),
            format!(
                "{owner}, the role enter() runs as, does not inherit pg_read_all_stats: it cannot \
                 see the caller's backend start time, so every proof fails (closed, but an outage)"
            ),
            Some(format!(
                "GRANT pg_read_all_stats TO {owner_ident}; ALTER ROLE {owner_ident} INHERIT;"
            )),
        );
    }
    Ok(())
}

/// Bind parameters reach the log when statements are logged and `log_parameter_max_length`
/// is not 0.
async fn logging(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query_privileged(
            "logging settings",
            "SELECT name, setting FROM pg_settings
             WHERE name IN ('log_parameter_max_length', 'log_statement',
                            'log_min_duration_statement', 'log_min_duration_sample')",
            &[],
        )
        .await?;
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let max_length = get("log_parameter_max_length").unwrap_or_else(|| "-1".into());
    let statement = get("log_statement").unwrap_or_default();
    let duration = |name: &str| {
        get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|ms| ms >= 0)
    };
    let logged = statement == "all"
        || duration("log_min_duration_statement")
        || duration("log_min_duration_sample");
    if max_length != "0" && logged {
        ctx.report(
            &SIGNED_PROOFS_LOGGED,
            None,
            format!(
                "statements are logged (log_statement = {statement}, or a duration threshold) \
                 with bind parameters (log_parameter_max_length = {max_length}): enter() proofs \
                 reach the server log"
            ),
            Some(
                "ALTER SYSTEM SET log_parameter_max_length = 0; SELECT pg_reload_conf(); (not \
                 ALTER ROLE ... SET: role defaults on the pool role are themselves a finding)"
                    .into(),
            ),
        );
    }
    Ok(())
}
