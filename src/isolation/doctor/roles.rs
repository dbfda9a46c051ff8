//! Checks on the pool role itself (checklist item 1): attributes, memberships, ownership,
//! CREATE/TEMP privileges, role defaults, and what its sessions can read about other sessions.

use tokio_postgres::Client;

use super::catalog::{
    POOL_ROLE_BYPASSRLS, POOL_ROLE_CREATEDB, POOL_ROLE_CREATEROLE, POOL_ROLE_DATABASE_CREATE,
    POOL_ROLE_MEMBER, POOL_ROLE_OWNS_DATABASE, POOL_ROLE_READS_ACTIVITY, POOL_ROLE_REPLICATION,
    POOL_ROLE_SCHEMA_CREATE, POOL_ROLE_SETTINGS, POOL_ROLE_SET_ROLE, POOL_ROLE_SUPERUSER,
    POOL_ROLE_TEMP, TENANT_SETTING_DEFAULT,
};
use super::{query, Ctx, DoctorError, PoolRole};

/// First server version (16) where `pg_has_role(..., 'SET')` exists.
const PG16: i32 = 160_000;

/// Who this session is: `session_user`, so a `SET ROLE` default cannot disguise it.
pub(super) async fn load_pool_role(upstream: &str, pool: &Client) -> Result<PoolRole, DoctorError> {
    let rows = query(
        upstream,
        pool,
        "the pool role",
        "SELECT r.oid, r.rolname::text, quote_ident(r.rolname), r.rolsuper, r.rolbypassrls,
                r.rolcreaterole, r.rolcreatedb, r.rolreplication,
                d.datname::text, quote_ident(d.datname), d.datdba = r.oid,
                has_database_privilege(r.oid, d.oid, 'CREATE'),
                has_database_privilege(r.oid, d.oid, 'TEMPORARY'),
                current_setting('server_version_num')::int, current_setting('server_version')
         FROM pg_roles r, pg_database d
         WHERE r.rolname = session_user AND d.datname = current_database()",
        &[],
    )
    .await?;
    let Some(r) = rows.first() else {
        // pg_roles always lists session_user; an empty answer means hidden catalogs.
        return Err(DoctorError::Catalog {
            upstream: upstream.to_owned(),
            reason: "the pool role cannot see itself in pg_roles".to_owned(),
        });
    };
    Ok(PoolRole {
        oid: r.get(0),
        name: r.get(1),
        ident: r.get(2),
        superuser: r.get(3),
        bypassrls: r.get(4),
        createrole: r.get(5),
        createdb: r.get(6),
        replication: r.get(7),
        database: r.get(8),
        database_ident: r.get(9),
        owns_database: r.get(10),
        database_create: r.get(11),
        database_temp: r.get(12),
        version_num: r.get(13),
        server_version: r.get(14),
    })
}

pub(super) async fn check(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    attributes(ctx);
    database_privileges(ctx);
    memberships(ctx).await?;
    if !ctx.role.superuser {
        // A superuser may do all of these; its own finding says so once.
        set_role_targets(ctx).await?;
        schema_create(ctx).await?;
    }
    role_settings(ctx).await?;
    activity(ctx).await
}

fn attributes(ctx: &mut Ctx<'_>) {
    let role = ctx.role.clone();
    let object = Some(role.name.clone());
    let alter = |attr: &str| Some(format!("ALTER ROLE {} {attr};", role.ident));
    if role.superuser {
        ctx.report(
            &POOL_ROLE_SUPERUSER,
            object.clone(),
            format!("{} is a superuser: row-level security never applies to it, so every tenant reads every row", role.name),
            alter("NOSUPERUSER"),
        );
    }
    if role.bypassrls {
        ctx.report(
            &POOL_ROLE_BYPASSRLS,
            object.clone(),
            format!(
                "{} has BYPASSRLS: no policy applies to it, so every tenant reads every row",
                role.name
            ),
            alter("NOBYPASSRLS"),
        );
    }
    if role.createrole {
        ctx.report(
            &POOL_ROLE_CREATEROLE,
            object.clone(),
            format!(
                "{} has CREATEROLE: before PostgreSQL 16 it can grant itself any non-superuser \
                 role (the tables' owner included) and reset other roles' passwords; from 16 it \
                 can still create and administer roles",
                role.name
            ),
            alter("NOCREATEROLE"),
        );
    }
    if role.createdb {
        ctx.report(
            &POOL_ROLE_CREATEDB,
            object.clone(),
            format!(
                "{} has CREATEDB: any tenant can create databases (objects outside this check, \
                 disk and connection use)",
                role.name
            ),
            alter("NOCREATEDB"),
        );
    }
    if role.replication {
        ctx.report(
            &POOL_ROLE_REPLICATION,
            object,
            format!(
                "{} has REPLICATION: replication connections and logical decoding read every \
                 tenant's changes, bypassing RLS",
                role.name
            ),
            alter("NOREPLICATION"),
        );
    }
}

fn database_privileges(ctx: &mut Ctx<'_>) {
    let role = ctx.role.clone();
    let db = Some(role.database.clone());
    if role.owns_database {
        ctx.report(
            &POOL_ROLE_OWNS_DATABASE,
            db.clone(),
            format!(
                "{} owns database {}: it can ALTER DATABASE ... SET for every session, create \
                 schemas, and (PostgreSQL 15+) owns schema public",
                role.name, role.database
            ),
            Some(format!(
                "ALTER DATABASE {} OWNER TO <a NOLOGIN owner role>;",
                role.database_ident
            )),
        );
    }
    if role.superuser || role.owns_database {
        return;
    }
    if role.database_create {
        ctx.report(
            &POOL_ROLE_DATABASE_CREATE,
            db.clone(),
            format!(
                "{} has CREATE on database {}: a tenant can CREATE SCHEMA {} (\"$user\" comes \
                 first in the default search_path) and shadow the shared tables for every \
                 pooled connection",
                role.name, role.database, role.ident
            ),
            Some(format!(
                "REVOKE CREATE ON DATABASE {db} FROM PUBLIC; REVOKE CREATE ON DATABASE {db} FROM {r};",
                db = role.database_ident,
                r = role.ident
            )),
        );
    }
    if role.database_temp {
        ctx.report(
            &POOL_ROLE_TEMP,
            db,
            format!(
                "{} has TEMPORARY on database {}: temporary tables come first in the search \
                 path (shadowing tables, including in SECURITY DEFINER functions without a \
                 fixed search_path) and live until DISCARD ALL",
                role.name, role.database
            ),
            Some(format!(
                "REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC; REVOKE TEMPORARY ON DATABASE {db} FROM {r};",
                db = role.database_ident,
                r = role.ident
            )),
        );
    }
}

async fn memberships(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "memberships",
            "SELECT g.rolname::text, quote_ident(g.rolname), m.admin_option
             FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = $1
             ORDER BY 1",
            &[&ctx.role.oid],
        )
        .await?;
    for r in rows {
        let (name, ident, admin): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        let admin = if admin { " WITH ADMIN OPTION" } else { "" };
        let message = format!(
            "{} is a member of {name}{admin}: every tenant gets {name}'s privileges (and can \
             SET ROLE {name}, unless the membership is granted WITH SET FALSE, INHERIT FALSE)",
            ctx.role.name
        );
        let fix = Some(format!("REVOKE {ident} FROM {};", ctx.role.ident));
        ctx.report(&POOL_ROLE_MEMBER, Some(name), message, fix);
    }
    Ok(())
}

/// Roles reachable by SET ROLE other than through a direct membership (reported above).
async fn set_role_targets(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let privilege = if ctx.role.version_num >= PG16 {
        "SET"
    } else {
        "MEMBER"
    };
    let rows = ctx
        .query(
            "SET ROLE targets",
            "SELECT r.rolname::text FROM pg_roles r
             WHERE r.oid <> $1 AND pg_has_role($1::oid, r.oid, $2::text)
               AND NOT EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = $1 AND m.roleid = r.oid)
             ORDER BY 1",
            &[&ctx.role.oid, &privilege],
        )
        .await?;
    for r in rows {
        let target: String = r.get(0);
        let message = format!(
            "{} can SET ROLE {target} through nested memberships: every tenant can act as {target}",
            ctx.role.name
        );
        ctx.report(
            &POOL_ROLE_SET_ROLE,
            Some(target),
            message,
            Some("revoke the pool role's memberships (see pool_role_member)".into()),
        );
    }
    Ok(())
}

async fn schema_create(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "schema privileges",
            "SELECT n.nspname::text, quote_ident(n.nspname), n.nspowner = $1
             FROM pg_namespace n
             WHERE has_schema_privilege($1::oid, n.oid, 'CREATE')
               AND n.nspname !~ '^pg_(toast_)?temp_'
             ORDER BY 1",
            &[&ctx.role.oid],
        )
        .await?;
    for r in rows {
        let (schema, ident, owner): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        let how = if owner { "owns" } else { "has CREATE on" };
        let message = format!(
            "{} {how} schema {schema}: a tenant can create tables, views and functions there \
             that shadow the shared ones (or operators and casts the policies use) for every \
             pooled connection",
            ctx.role.name
        );
        let fix = if owner {
            format!("ALTER SCHEMA {ident} OWNER TO <a NOLOGIN owner role>;")
        } else {
            format!(
                "REVOKE CREATE ON SCHEMA {ident} FROM PUBLIC; REVOKE CREATE ON SCHEMA {ident} FROM {};",
                ctx.role.ident
            )
        };
        ctx.report(&POOL_ROLE_SCHEMA_CREATE, Some(schema), message, Some(fix));
    }
    Ok(())
}

/// `ALTER ROLE <pool> [IN DATABASE db] SET ...` (observed as an attack), and database- or
/// cluster-wide defaults of the tenant setting.
async fn role_settings(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "role settings",
            "SELECT s.setrole = $1, s.setdatabase = 0, s.setconfig
             FROM pg_db_role_setting s
             WHERE s.setrole IN ($1::oid, 0)
               AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
             ORDER BY 1 DESC, 2",
            &[&ctx.role.oid],
        )
        .await?;
    let setting = ctx.tenant_setting.to_ascii_lowercase();
    for r in rows {
        let (for_pool, all_databases, config): (bool, bool, Option<Vec<String>>) =
            (r.get(0), r.get(1), r.get(2));
        let config = config.unwrap_or_default();
        let scope = if all_databases {
            String::new()
        } else {
            format!(" IN DATABASE {}", ctx.role.database_ident)
        };
        if for_pool {
            let message =
                format!(
                "{} has role defaults{}: {} (a tenant that can ALTER ROLE ... SET changes every \
                 new pooled connection: search_path, timeouts, read-only, role)",
                ctx.role.name,
                if all_databases { "" } else { " in this database" },
                config.join(", ")
            );
            let fix = Some(format!("ALTER ROLE {}{scope} RESET ALL;", ctx.role.ident));
            ctx.report(
                &POOL_ROLE_SETTINGS,
                Some(ctx.role.name.clone()),
                message,
                fix,
            );
            continue;
        }
        if ctx.opts.signed_schema.is_some() {
            continue; // policies do not read the plain setting in signed mode
        }
        for entry in &config {
            let name = entry.split('=').next().unwrap_or_default();
            if name.to_ascii_lowercase() != setting {
                continue;
            }
            let (what, fix) = if all_databases {
                (
                    "every role in every database".to_owned(),
                    format!("ALTER ROLE ALL RESET {};", ctx.tenant_setting),
                )
            } else {
                (
                    format!("every role in database {}", ctx.role.database),
                    format!(
                        "ALTER DATABASE {} RESET {};",
                        ctx.role.database_ident, ctx.tenant_setting
                    ),
                )
            };
            let message = format!(
                "{entry} is a default for {what}: a session with no tenant applied starts \
                 inside that tenant"
            );
            ctx.report(
                &TENANT_SETTING_DEFAULT,
                Some(ctx.tenant_setting.to_owned()),
                message,
                Some(fix),
            );
        }
    }
    Ok(())
}

/// Backends of the same role show each other's query text; all tenants share the pool role.
async fn activity(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "pg_stat_activity access",
            "SELECT coalesce(has_function_privilege($1::oid, to_regprocedure('pg_catalog.pg_stat_get_activity(integer)'), 'EXECUTE'), false)
                 OR coalesce(has_function_privilege($1::oid, to_regprocedure('pg_catalog.pg_stat_get_backend_activity(integer)'), 'EXECUTE'), false)",
            &[&ctx.role.oid],
        )
        .await?;
    let readable = rows.first().is_some_and(|r| r.get::<_, bool>(0));
    if readable && !ctx.role.superuser {
        let message = format!(
            "{} can read pg_stat_activity: the query text of the other pooled backends (other \
             tenants' statements, with their literals) is visible to every tenant",
            ctx.role.name
        );
        ctx.report(
            &POOL_ROLE_READS_ACTIVITY,
            Some(ctx.role.name.clone()),
            message,
            Some(
                "as a superuser: REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer), \
                 pg_catalog.pg_stat_get_backend_activity(integer) FROM PUBLIC; then GRANT it to \
                 your monitoring role (or block these functions in the proxy's SQL guard)"
                    .into(),
            ),
        );
    }
    Ok(())
}
