//! Checks on every table with the tenant column (checklist item 2): RLS enabled and forced,
//! policies that compare the tenant column with the tenant context, the column's
//! constraints, TRUNCATE; then tables without the column that the pool role can write.

use std::collections::BTreeSet;

use super::catalog::{
    POLICY_COMMANDS_PARTIAL, POLICY_EXPRESSION_OR, POLICY_NOT_TENANT_SCOPED,
    POOL_ROLE_OWNS_POLICY_FUNCTION, POOL_ROLE_OWNS_TENANT_TABLE, TABLE_NO_POLICY,
    TABLE_NO_TENANT_POLICY, TABLE_RLS_DISABLED, TABLE_RLS_NOT_FORCED, TABLE_TRUNCATE_GRANTED,
    TABLE_WITHOUT_TENANT_COLUMN, TENANT_COLUMN_ALLOWS_EMPTY, TENANT_COLUMN_NULLABLE,
};
use super::policy_text::{excludes_empty, is_tenant_scoped, Command, TenantContext};
use super::{objects, probe, Ctx, DoctorError};

/// What was inspected, for the summary line.
#[derive(Debug, Default)]
pub(super) struct Inventory {
    /// Tenant tables the pool role has any privilege on.
    pub tenant_tables: usize,
    /// Views and materialized views over tenant tables that the pool role can use.
    pub views: usize,
}

/// A table (relkind r/p) with the tenant column.
#[derive(Debug, Clone)]
pub(super) struct TenantTable {
    pub oid: u32,
    /// `schema.table`, each part as `quote_ident` gives it: usable in SQL as is.
    pub name: String,
    pub owner_oid: u32,
    pub owner: String,
    pub rls: bool,
    pub forced: bool,
    /// The pool role is the owner or a member of it.
    pub pool_owns: bool,
    pub attnum: i16,
    /// `quote_ident(<tenant column>)`.
    pub column: String,
    pub not_null: bool,
    /// Text-like type (text, varchar, char, name, or a domain over one): '' is a value.
    pub stringy: bool,
    pub select: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// Column-level grants.
    pub any_column: bool,
}

impl TenantTable {
    /// The pool role holds some privilege on it: tenants can reach it.
    pub fn usable(&self) -> bool {
        self.select || self.insert || self.update || self.delete || self.truncate || self.any_column
    }

    fn granted_commands(&self) -> BTreeSet<Command> {
        [
            (self.select, Command::Select),
            (self.insert, Command::Insert),
            (self.update, Command::Update),
            (self.delete, Command::Delete),
        ]
        .into_iter()
        .filter_map(|(granted, cmd)| granted.then_some(cmd))
        .collect()
    }
}

/// A row of `pg_policy` with its expressions as `pg_get_expr` prints them.
#[derive(Debug, Clone)]
struct Policy {
    table: u32,
    name: String,
    ident: String,
    command: Command,
    permissive: bool,
    /// `TO` includes PUBLIC or a role the pool role is a member of.
    applies: bool,
    using: Option<String>,
    with_check: Option<String>,
}

pub(super) async fn check(ctx: &mut Ctx<'_>) -> Result<Inventory, DoctorError> {
    let tables = load_tenant_tables(ctx).await?;
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    for t in tables.iter().filter(|t| t.pool_owns) {
        let message = format!(
            "{} owns {} (directly or through membership): an owner can ALTER TABLE ... \
             DISABLE/NO FORCE ROW LEVEL SECURITY and DROP POLICY",
            ctx.role.name, t.name
        );
        let fix = Some(format!(
            "ALTER TABLE {} OWNER TO <a NOLOGIN owner role>;",
            t.name
        ));
        ctx.report(
            &POOL_ROLE_OWNS_TENANT_TABLE,
            Some(t.name.clone()),
            message,
            fix,
        );
    }
    policy_functions(ctx, &oids).await?;

    let usable: Vec<TenantTable> = tables.iter().filter(|t| t.usable()).cloned().collect();
    let policies = load_policies(ctx, &oids).await?;
    let tenant_ctx = TenantContext::load(ctx).await?;
    let constraints = load_check_constraints(ctx, &oids).await?;
    // Tables without a static fatal finding: the probe looks for what the text checks missed.
    let mut clean = BTreeSet::new();
    for t in &usable {
        let own: Vec<&Policy> = policies.iter().filter(|p| p.table == t.oid).collect();
        let fatal_before = fatal_count(ctx);
        table_rls(ctx, t);
        table_policies(ctx, t, &own, &tenant_ctx);
        tenant_column(ctx, t, &constraints);
        if fatal_count(ctx) == fatal_before {
            clean.insert(t.oid);
        }
    }
    let probed: Vec<&TenantTable> = usable
        .iter()
        .filter(|t| clean.contains(&t.oid) && t.select)
        .collect();
    if !ctx.role.superuser && !ctx.role.bypassrls {
        probe::run(ctx, &probed).await?;
    }
    let views = objects::views(ctx, &oids).await?;
    objects::security_definer_functions(ctx, &tables).await?;
    writable_without_column(ctx).await?;
    Ok(Inventory {
        tenant_tables: usable.len(),
        views,
    })
}

fn fatal_count(ctx: &Ctx<'_>) -> usize {
    ctx.findings
        .iter()
        .filter(|f| f.severity == super::Severity::Fatal)
        .count()
}

async fn load_tenant_tables(ctx: &Ctx<'_>) -> Result<Vec<TenantTable>, DoctorError> {
    let rows = ctx
        .query(
            "tenant tables",
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                    c.relowner, pg_get_userbyid(c.relowner)::text,
                    c.relrowsecurity, c.relforcerowsecurity, pg_has_role($1::oid, c.relowner, 'MEMBER'),
                    a.attnum, quote_ident(a.attname), a.attnotnull OR t.typnotnull,
                    coalesce(bt.typcategory, t.typcategory) = 'S',
                    has_table_privilege($1::oid, c.oid, 'SELECT'), has_table_privilege($1::oid, c.oid, 'INSERT'),
                    has_table_privilege($1::oid, c.oid, 'UPDATE'), has_table_privilege($1::oid, c.oid, 'DELETE'),
                    has_table_privilege($1::oid, c.oid, 'TRUNCATE'),
                    has_any_column_privilege($1::oid, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
             WHERE c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
             ORDER BY 2",
            &[&ctx.role.oid, &ctx.opts.tenant_column],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TenantTable {
            oid: r.get(0),
            name: r.get(1),
            owner_oid: r.get(2),
            owner: r.get(3),
            rls: r.get(4),
            forced: r.get(5),
            pool_owns: r.get(6),
            attnum: r.get(7),
            column: r.get(8),
            not_null: r.get(9),
            stringy: r.get(10),
            select: r.get(11),
            insert: r.get(12),
            update: r.get(13),
            delete: r.get(14),
            truncate: r.get(15),
            any_column: r.get(16),
        })
        .collect())
}

async fn load_policies(ctx: &Ctx<'_>, tables: &[u32]) -> Result<Vec<Policy>, DoctorError> {
    let rows = ctx
        .query(
            "policies",
            "SELECT p.polrelid, p.polname::text, quote_ident(p.polname), p.polcmd::text, p.polpermissive,
                    0::oid = ANY (p.polroles)
                      OR EXISTS (SELECT 1 FROM unnest(p.polroles) r WHERE r <> 0 AND pg_has_role($1::oid, r, 'MEMBER')),
                    pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
             FROM pg_policy p
             WHERE p.polrelid = ANY ($2)
             ORDER BY p.polrelid, p.polname",
            &[&ctx.role.oid, &tables],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Policy {
            table: r.get(0),
            name: r.get(1),
            ident: r.get(2),
            command: Command::from_polcmd(r.get(3)),
            permissive: r.get(4),
            applies: r.get(5),
            using: r.get(6),
            with_check: r.get(7),
        })
        .collect())
}

/// Check constraints of the tables, and of the tenant column's domain (as `VALUE`).
async fn load_check_constraints(
    ctx: &Ctx<'_>,
    tables: &[u32],
) -> Result<Vec<(u32, Vec<i16>, String)>, DoctorError> {
    let rows = ctx
        .query(
            "check constraints",
            "SELECT c.conrelid, c.conkey, pg_get_constraintdef(c.oid)
             FROM pg_constraint c
             WHERE c.contype = 'c' AND c.conrelid = ANY ($1)
             UNION ALL
             SELECT a.attrelid, ARRAY[a.attnum], pg_get_constraintdef(c.oid)
             FROM pg_attribute a JOIN pg_constraint c ON c.contypid = a.atttypid AND c.contype = 'c'
             WHERE a.attrelid = ANY ($1) AND a.attname = $2",
            &[&tables, &ctx.opts.tenant_column],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Vec<i16>>(1), r.get(2)))
        .collect())
}

fn table_rls(ctx: &mut Ctx<'_>, t: &TenantTable) {
    if !t.rls {
        ctx.report(
            &TABLE_RLS_DISABLED,
            Some(t.name.clone()),
            format!(
                "{} has row-level security disabled: every tenant reads and writes every row",
                t.name
            ),
            Some(format!(
                "ALTER TABLE {n} ENABLE ROW LEVEL SECURITY; ALTER TABLE {n} FORCE ROW LEVEL SECURITY;",
                n = t.name
            )),
        );
    } else if !t.forced {
        ctx.report(
            &TABLE_RLS_NOT_FORCED,
            Some(t.name.clone()),
            format!(
                "{} enables row-level security but does not FORCE it: its owner {} (and views and \
                 SECURITY DEFINER functions owned by {}) bypass every policy",
                t.name, t.owner, t.owner
            ),
            Some(format!("ALTER TABLE {} FORCE ROW LEVEL SECURITY;", t.name)),
        );
    }
    if t.truncate {
        ctx.report(
            &TABLE_TRUNCATE_GRANTED,
            Some(t.name.clone()),
            format!(
                "{} may TRUNCATE {}: TRUNCATE ignores row-level security, so one tenant can \
                 delete every tenant's rows",
                ctx.role.name, t.name
            ),
            Some(format!(
                "REVOKE TRUNCATE ON {} FROM PUBLIC, {};",
                t.name, ctx.role.ident
            )),
        );
    }
}

fn table_policies(ctx: &mut Ctx<'_>, t: &TenantTable, own: &[&Policy], tc: &TenantContext) {
    if own.is_empty() {
        let message = if t.rls {
            format!(
                "{} has row-level security but no policy: every row is denied, so the table is \
                 unusable through the proxy (revoke the pool role's privileges if it is meant \
                 to be hidden)",
                t.name
            )
        } else {
            format!("{} has no policy", t.name)
        };
        ctx.report(
            &TABLE_NO_POLICY,
            Some(t.name.clone()),
            message,
            Some(tc.policy_sql("tenant_isolation", &t.name, &t.column)),
        );
        return;
    }
    let mut covered = BTreeSet::new();
    for p in own.iter().filter(|p| p.permissive && p.applies) {
        if check_policy(ctx, t, p, tc) {
            covered.extend(p.command.expand());
        }
    }
    if covered.is_empty() {
        ctx.report(
            &TABLE_NO_TENANT_POLICY,
            Some(t.name.clone()),
            format!(
                "no permissive policy that applies to {} restricts {} to {} = {}",
                ctx.role.name,
                t.name,
                t.column,
                tc.describe()
            ),
            Some(tc.policy_sql("tenant_isolation", &t.name, &t.column)),
        );
        return;
    }
    let missing: Vec<&str> = t
        .granted_commands()
        .difference(&covered)
        .map(|c| c.sql())
        .collect();
    if !missing.is_empty() {
        ctx.report(
            &POLICY_COMMANDS_PARTIAL,
            Some(t.name.clone()),
            format!(
                "{} is granted {} on {} but no tenant policy covers it: denied (fails closed); \
                 add a policy or revoke the privilege",
                ctx.role.name,
                missing.join(", "),
                t.name
            ),
            None,
        );
    }
}

/// Reports a permissive policy (that applies to the pool role) whose USING or WITH CHECK does
/// not compare the tenant column with the context, and scoped clauses with an OR. Returns
/// whether the policy is scoped.
fn check_policy(ctx: &mut Ctx<'_>, t: &TenantTable, p: &Policy, tc: &TenantContext) -> bool {
    let object = format!("{}.{}", t.name, p.ident);
    let clauses = [("USING", &p.using), ("WITH CHECK", &p.with_check)];
    let mut unscoped = Vec::new();
    for (clause, expr) in clauses {
        let Some(expr) = expr else { continue };
        if !is_tenant_scoped(expr, &t.column, tc) {
            unscoped.push(format!("{clause} ({expr}){}", tc.plain_setting_note(expr)));
        } else if expr.contains(" OR ") {
            ctx.report(
                &POLICY_EXPRESSION_OR,
                Some(object.clone()),
                format!(
                    "policy {} on {} has {clause} ({expr}): an OR branch that does not compare {} \
                     with the tenant admits rows to every tenant",
                    p.name, t.name, t.column
                ),
                None,
            );
        }
    }
    if unscoped.is_empty() {
        return true;
    }
    ctx.report(
        &POLICY_NOT_TENANT_SCOPED,
        Some(object),
        format!(
            "permissive policy {} ({}) on {} applies to {} with {}, which does not compare {} \
             with {}; permissive policies are OR-ed, so it admits every tenant's rows",
            p.name,
            p.command.sql(),
            t.name,
            ctx.role.name,
            unscoped.join(" and "),
            t.column,
            tc.describe(),
        ),
        Some(tc.alter_policy_sql(&p.ident, &t.name, &t.column, p.command)),
    );
    false
}

fn tenant_column(ctx: &mut Ctx<'_>, t: &TenantTable, constraints: &[(u32, Vec<i16>, String)]) {
    let column_name = t.column.trim_matches('"');
    if t.stringy {
        let guarded = constraints.iter().any(|(table, keys, def)| {
            *table == t.oid && keys.contains(&t.attnum) && excludes_empty(def, &t.column)
        });
        if !guarded {
            ctx.report(
                &TENANT_COLUMN_ALLOWS_EMPTY,
                Some(format!("{}.{}", t.name, t.column)),
                format!(
                    "{}.{} accepts '': RESET and DISCARD ALL leave the setting '' (not NULL), and \
                     current_setting(..., true) then matches rows whose tenant is ''",
                    t.name, t.column
                ),
                Some(format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} <> '');",
                    t.name,
                    quote_ident_simple(&format!("{column_name}_not_empty")),
                    t.column
                )),
            );
        }
    }
    if !t.not_null {
        ctx.report(
            &TENANT_COLUMN_NULLABLE,
            Some(format!("{}.{}", t.name, t.column)),
            format!(
                "{}.{} allows NULL: such rows belong to no tenant (invisible, but a schema error)",
                t.name, t.column
            ),
            Some(format!(
                "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL;",
                t.name, t.column
            )),
        );
    }
}

/// Functions that policies on tenant tables call, owned by the pool role (or a role it is a
/// member of): `CREATE OR REPLACE` rewrites the policy.
async fn policy_functions(ctx: &mut Ctx<'_>, tables: &[u32]) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "policy functions",
            "SELECT DISTINCT f.oid::regprocedure::text, pg_get_userbyid(f.proowner)::text
             FROM pg_policy pol
             JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = pol.oid
                             AND d.refclassid = 'pg_proc'::regclass
             JOIN pg_proc f ON f.oid = d.refobjid
             WHERE pol.polrelid = ANY ($2) AND pg_has_role($1::oid, f.proowner, 'MEMBER')
             ORDER BY 1",
            &[&ctx.role.oid, &tables],
        )
        .await?;
    for r in rows {
        let (function, owner): (String, String) = (r.get(0), r.get(1));
        let message = format!(
            "policies on tenant tables call {function}, owned by {owner}, which {} is or is a \
             member of: CREATE OR REPLACE FUNCTION turns the policy into USING (true)",
            ctx.role.name
        );
        let fix = Some(format!(
            "ALTER FUNCTION {function} OWNER TO <a NOLOGIN owner role>;"
        ));
        ctx.report(
            &POOL_ROLE_OWNS_POLICY_FUNCTION,
            Some(function),
            message,
            fix,
        );
    }
    Ok(())
}

/// Tables without the tenant column that the pool role can change: one tenant writes what
/// every other tenant reads. The signed-context schema has its own checks.
async fn writable_without_column(ctx: &mut Ctx<'_>) -> Result<(), DoctorError> {
    let rows = ctx
        .query(
            "tables without the tenant column",
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
               AND n.nspname::text IS DISTINCT FROM $3::text
               AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                               WHERE a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped)
               AND has_table_privilege($1::oid, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
             ORDER BY 1",
            &[
                &ctx.role.oid,
                &ctx.opts.tenant_column,
                &ctx.opts.signed_schema,
            ],
        )
        .await?;
    for r in rows {
        let table: String = r.get(0);
        let message = format!(
            "{} can write {table}, which has no {} column: data one tenant writes there is \
             shared with every tenant",
            ctx.role.name, ctx.opts.tenant_column
        );
        let fix = Some(format!(
            "add the tenant column with RLS, or REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {table} FROM PUBLIC, {};",
            ctx.role.ident
        ));
        ctx.report(&TABLE_WITHOUT_TENANT_COLUMN, Some(table), message, fix);
    }
    Ok(())
}

/// `quote_ident` for names this module makes up (constraint names): lower-case ASCII
/// identifiers stay bare, anything else is double-quoted.
fn quote_ident_simple(s: &str) -> String {
    let bare = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}
