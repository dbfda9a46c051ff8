//! Every check the doctor runs: its stable id, severity and one-line summary.
//!
//! Ids are an interface (scripts match on them, `render_json` emits them): never rename one;
//! retire it and add a new id instead.
//!
//! Severity policy: **fatal** means a tenant can read or change another tenant's rows, or
//! can change what every pooled connection does, or the upstream cannot be served at all.
//! **warning** means a weakness to review that does not by itself cross tenants (often a
//! fail-closed gap). **info** is context.
//!
//! CREATEROLE is fatal: up to PostgreSQL 15 such a role can grant itself membership in any
//! non-superuser role (the table owner included) and change other roles' passwords; from 16
//! it can still create roles and administer them. CREATEDB is a warning: a new database
//! does not see the shared one's rows (copying it as a template needs ownership of it), but
//! it lets a tenant create objects outside the doctor's view and consume resources.

use super::Severity;

/// One check: stable id, severity of its findings, summary for `--list-checks` style output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub id: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
}

const fn fatal(id: &'static str, summary: &'static str) -> Check {
    Check {
        id,
        severity: Severity::Fatal,
        summary,
    }
}

const fn warning(id: &'static str, summary: &'static str) -> Check {
    Check {
        id,
        severity: Severity::Warning,
        summary,
    }
}

// Pool role.
pub const POOL_ROLE_SUPERUSER: Check = fatal(
    "pool_role_superuser",
    "the pool role is a superuser: RLS never applies",
);
pub const POOL_ROLE_BYPASSRLS: Check = fatal(
    "pool_role_bypassrls",
    "the pool role has BYPASSRLS: RLS never applies",
);
pub const POOL_ROLE_CREATEROLE: Check = fatal(
    "pool_role_createrole",
    "the pool role has CREATEROLE: it can acquire other roles (PG <= 15) or create them",
);
pub const POOL_ROLE_CREATEDB: Check = warning(
    "pool_role_createdb",
    "the pool role has CREATEDB: tenants can create databases",
);
pub const POOL_ROLE_REPLICATION: Check = fatal(
    "pool_role_replication",
    "the pool role has REPLICATION: WAL and logical decoding expose every tenant's rows",
);
pub const POOL_ROLE_MEMBER: Check = fatal(
    "pool_role_member",
    "the pool role is a member of another role (inherits its rights, may SET ROLE to it)",
);
pub const POOL_ROLE_SET_ROLE: Check = fatal(
    "pool_role_set_role",
    "the pool role can SET ROLE to another role through indirect membership",
);
pub const POOL_ROLE_OWNS_DATABASE: Check = fatal(
    "pool_role_owns_database",
    "the pool role owns the shared database",
);
pub const POOL_ROLE_OWNS_TENANT_TABLE: Check = fatal(
    "pool_role_owns_tenant_table",
    "the pool role owns (or is a member of the owner of) a tenant table: it can disable RLS",
);
pub const POOL_ROLE_OWNS_POLICY_FUNCTION: Check = fatal(
    "pool_role_owns_policy_function",
    "the pool role owns a function a tenant policy calls: it can redefine the policy",
);
pub const POOL_ROLE_SCHEMA_CREATE: Check = fatal(
    "pool_role_schema_create",
    "the pool role has CREATE on a schema: it can shadow tables and functions",
);
pub const POOL_ROLE_DATABASE_CREATE: Check = fatal(
    "pool_role_database_create",
    "the pool role has CREATE on the database: it can create a schema named after itself \
     (first in the default search_path) and shadow every table",
);
pub const POOL_ROLE_TEMP: Check = warning(
    "pool_role_temp",
    "the pool role has TEMP on the database: temporary objects shadow tables in its session",
);
pub const POOL_ROLE_SETTINGS: Check = fatal(
    "pool_role_settings",
    "the pool role has defaults in pg_db_role_setting (ALTER ROLE ... SET)",
);
pub const TENANT_SETTING_DEFAULT: Check = fatal(
    "tenant_setting_default",
    "the tenant setting has a database- or cluster-wide default",
);
pub const POOL_ROLE_READS_ACTIVITY: Check = warning(
    "pool_role_reads_activity",
    "the pool role reads pg_stat_activity: every tenant sees the other tenants' last queries",
);

// Tables with the tenant column.
pub const TABLE_RLS_DISABLED: Check = fatal(
    "table_rls_disabled",
    "a tenant table does not have row-level security enabled",
);
pub const TABLE_RLS_NOT_FORCED: Check = fatal(
    "table_rls_not_forced",
    "a tenant table has RLS enabled but not forced: its owner bypasses it",
);
pub const TABLE_TRUNCATE_GRANTED: Check = fatal(
    "table_truncate_granted",
    "the pool role may TRUNCATE a tenant table: TRUNCATE ignores RLS",
);
pub const TABLE_NO_POLICY: Check = fatal(
    "table_no_policy",
    "a tenant table has no policy at all (every row denied: unusable through the proxy)",
);
pub const POLICY_NOT_TENANT_SCOPED: Check = fatal(
    "policy_not_tenant_scoped",
    "a permissive policy that applies to the pool role does not compare the tenant column \
     with the tenant context",
);
pub const TABLE_NO_TENANT_POLICY: Check = fatal(
    "table_no_tenant_policy",
    "no permissive policy applying to the pool role restricts a tenant table to the tenant",
);
pub const POLICY_COMMANDS_PARTIAL: Check = warning(
    "policy_commands_partial",
    "tenant policies cover only some of the commands the pool role is granted",
);
pub const POLICY_EXPRESSION_OR: Check = warning(
    "policy_expression_or",
    "a tenant policy contains OR: review that no branch admits other tenants' rows",
);
pub const TENANT_COLUMN_ALLOWS_EMPTY: Check = warning(
    "tenant_column_allows_empty",
    "the tenant column has no CHECK (<col> <> ''): RESET leaves '' and such rows match it",
);
pub const TENANT_COLUMN_NULLABLE: Check =
    warning("tenant_column_nullable", "the tenant column allows NULL");
pub const TABLE_WITHOUT_TENANT_COLUMN: Check = warning(
    "table_without_tenant_column",
    "the pool role can write a table without the tenant column: state shared across tenants",
);
pub const RLS_PROBE_ROWS_VISIBLE: Check = fatal(
    "rls_probe_rows_visible",
    "with an unknown or empty tenant context, the pool role still reads rows",
);

// Views and functions.
pub const VIEW_NOT_SECURITY_INVOKER: Check = fatal(
    "view_not_security_invoker",
    "a view over a tenant table, usable by the pool role, lacks security_invoker = true",
);
pub const MATVIEW_OVER_TENANT_TABLE: Check = fatal(
    "matview_over_tenant_table",
    "a materialized view over a tenant table is readable by the pool role (no RLS on it)",
);
pub const SECURITY_DEFINER_FUNCTION: Check = warning(
    "security_definer_function",
    "the pool role may execute a SECURITY DEFINER function of a table owner or RLS-exempt role",
);

// Signed tenant context.
pub const SIGNED_SCHEMA_MISSING: Check = fatal(
    "signed_schema_missing",
    "the signed-context schema does not exist",
);
pub const SIGNED_FUNCTION_MISSING: Check = fatal(
    "signed_function_missing",
    "enter/current_tenant/leave is missing from the signed-context schema",
);
pub const SIGNED_FUNCTION_NOT_EXECUTABLE: Check = fatal(
    "signed_function_not_executable",
    "the pool role cannot execute a signed-context function",
);
pub const SIGNED_FUNCTION_NOT_DEFINER: Check = fatal(
    "signed_function_not_definer",
    "a signed-context function is not SECURITY DEFINER with a fixed search_path",
);
pub const SIGNED_KEYS_READABLE: Check = fatal(
    "signed_keys_readable",
    "the pool role can access the signed-context key table",
);
pub const SIGNED_KEYS_TABLE_MISSING: Check = fatal(
    "signed_keys_table_missing",
    "the signed-context schema has no key table (a table whose name contains \"key\")",
);
pub const SIGNED_TABLE_ACCESSIBLE: Check = fatal(
    "signed_table_accessible",
    "the pool role can access a table of the signed-context schema",
);
pub const SIGNED_OWNER_CANNOT_READ_KEYS: Check = fatal(
    "signed_owner_cannot_read_keys",
    "the role enter() runs as cannot read the key table: every proof fails",
);
pub const SIGNED_OWNER_LACKS_READ_ALL_STATS: Check = fatal(
    "signed_owner_lacks_read_all_stats",
    "the role enter() runs as does not inherit pg_read_all_stats: every proof fails",
);
pub const SIGNED_PROOFS_LOGGED: Check = warning(
    "signed_proofs_logged",
    "statements are logged with their bind parameters: proofs reach the server log",
);

// Meta.
pub const INSPECTED: Check = Check {
    id: "inspected",
    severity: Severity::Info,
    summary: "what the doctor inspected on this upstream",
};
pub const UPSTREAM_UNCHECKED: Check = fatal(
    "upstream_unchecked",
    "the doctor could not inspect this upstream",
);

/// All checks, in report order.
pub const CHECKS: &[Check] = &[
    POOL_ROLE_SUPERUSER,
    POOL_ROLE_BYPASSRLS,
    POOL_ROLE_CREATEROLE,
    POOL_ROLE_CREATEDB,
    POOL_ROLE_REPLICATION,
    POOL_ROLE_MEMBER,
    POOL_ROLE_SET_ROLE,
    POOL_ROLE_OWNS_DATABASE,
    POOL_ROLE_OWNS_TENANT_TABLE,
    POOL_ROLE_OWNS_POLICY_FUNCTION,
    POOL_ROLE_SCHEMA_CREATE,
    POOL_ROLE_DATABASE_CREATE,
    POOL_ROLE_TEMP,
    POOL_ROLE_SETTINGS,
    TENANT_SETTING_DEFAULT,
    POOL_ROLE_READS_ACTIVITY,
    TABLE_RLS_DISABLED,
    TABLE_RLS_NOT_FORCED,
    TABLE_TRUNCATE_GRANTED,
    TABLE_NO_POLICY,
    POLICY_NOT_TENANT_SCOPED,
    TABLE_NO_TENANT_POLICY,
    POLICY_COMMANDS_PARTIAL,
    POLICY_EXPRESSION_OR,
    TENANT_COLUMN_ALLOWS_EMPTY,
    TENANT_COLUMN_NULLABLE,
    TABLE_WITHOUT_TENANT_COLUMN,
    RLS_PROBE_ROWS_VISIBLE,
    VIEW_NOT_SECURITY_INVOKER,
    MATVIEW_OVER_TENANT_TABLE,
    SECURITY_DEFINER_FUNCTION,
    SIGNED_SCHEMA_MISSING,
    SIGNED_FUNCTION_MISSING,
    SIGNED_FUNCTION_NOT_EXECUTABLE,
    SIGNED_FUNCTION_NOT_DEFINER,
    SIGNED_KEYS_READABLE,
    SIGNED_KEYS_TABLE_MISSING,
    SIGNED_TABLE_ACCESSIBLE,
    SIGNED_OWNER_CANNOT_READ_KEYS,
    SIGNED_OWNER_LACKS_READ_ALL_STATS,
    SIGNED_PROOFS_LOGGED,
    INSPECTED,
    UPSTREAM_UNCHECKED,
];

/// The check with this id.
pub fn by_id(id: &str) -> Option<&'static Check> {
    CHECKS.iter().find(|c| c.id == id)
}
