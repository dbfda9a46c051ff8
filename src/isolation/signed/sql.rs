//! SQL of the signed tenant context: the install script and the statements the proxy
//! sends. Pure text generation; names are checked by [`ident`] before they are embedded.
//!
//! # Objects (schema `S`, owner role `O`, pool role `P`)
//! - `O`: NOLOGIN, INHERIT, CONNECTION LIMIT 0, member of `pg_read_all_stats` and of
//!   nothing else; nobody may be a member of `O` (the script refuses to continue if anyone is).
//! - `S`: owned by `O`, `REVOKE ALL FROM PUBLIC`, `USAGE` for `P` only.
//! - `S.context_keys(key_id, secret, created_at, retired_at)`: HMAC keys; readable by `O` only.
//! - `S.backend_context(pid, backend_start, seq, tenant, expires_at, key_id)`: UNLOGGED, one
//!   row per server backend, keyed by (pid, backend_start); readable by `O` only.
//! - `S._hmac(msg, key)`: HMAC-SHA256 through pgcrypto, schema-qualified; `O` only.
//! - SECURITY DEFINER functions (owner `O`, `SET search_path = pg_catalog, pg_temp`,
//!   EXECUTE for `P` only): `S.enter(text, bigint, bigint, text, text)`,
//!   `S.current_tenant()`, `S.leave()`, `S.backend_identity()`.
//!
//! # Canonical message (version 1)
//! ```text
//! v1|<tenant>|<pid>|<backend_start_micros>|<seq>|<exp>
//! ```
//! UTF-8 bytes; integers in canonical decimal (`-` sign if negative, no `+`, no leading
//! zeros); `backend_start_micros` is `pg_stat_activity.backend_start` in microseconds since
//! the Unix epoch, as returned by `S.backend_identity()`; `exp` in Unix seconds. The tenant
//! may contain `|`: the four fields after it are integers, so the message still parses
//! uniquely from the right. MAC = lowercase hex of HMAC-SHA256(secret, message).

use std::fmt::Write as _;

/// Default schema of the context objects.
pub const DEFAULT_SCHEMA: &str = "pgtenant";
/// Default NOLOGIN owner role of the schema and the SECURITY DEFINER functions.
pub const DEFAULT_OWNER: &str = "pgtenant_ctx_owner";
/// Latest `exp` that `enter` accepts (9999-12-31T23:59:59Z): `to_timestamp` stays in range.
pub const MAX_EXP_UNIX: i64 = 253_402_300_799;
/// Longest tenant id `enter` accepts, in bytes.
pub const MAX_TENANT_BYTES: usize = 256;

/// Checks a schema or role name for embedding in SQL: `[a-z_][a-z0-9_]*`, at most 63 bytes,
/// not `pg_`-prefixed and not `public`. Anything else (quoting, upper case) is refused
/// rather than escaped: these names appear in a reviewed security script.
pub fn ident(kind: &str, name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || name.len() > 63 {
        anyhow::bail!("{kind} {name:?} must match [a-z_][a-z0-9_]* (at most 63 bytes)");
    }
    if name.starts_with("pg_") || name == "public" {
        anyhow::bail!("{kind} {name:?} is reserved");
    }
    Ok(())
}

/// A table or column name for [`policy_sql`]: same characters as [`ident`], reserved
/// names allowed.
fn plain_name(kind: &str, name: &str) -> anyhow::Result<()> {
    match ident(kind, name) {
        Err(_) if name == "public" || name.starts_with("pg_") => Ok(()),
        other => other,
    }
}

/// Checks the three names of an install: valid identifiers, owner and pool role distinct.
pub fn check_names(schema: &str, owner_role: &str, pool_role: &str) -> anyhow::Result<()> {
    ident("schema", schema)?;
    ident("owner role", owner_role)?;
    ident("pool role", pool_role)?;
    if owner_role == pool_role {
        anyhow::bail!("the owner role and the pool role must differ");
    }
    Ok(())
}

/// The idempotent install script, one transaction. Run it as a superuser (or a role that
/// may create roles, grant `pg_read_all_stats` and create the pgcrypto extension) in the
/// database holding the tenant tables. The pool role must already exist.
///
/// Panics never; returns an error for names [`check_names`] refuses.
pub fn install_sql(schema: &str, owner_role: &str, pool_role: &str) -> anyhow::Result<String> {
    check_names(schema, owner_role, pool_role)?;
    let (s, o, p) = (schema, owner_role, pool_role);
    let max = MAX_TENANT_BYTES;
    let mut sql = String::new();
    let _ = write!(
        sql,
        r#"-- pgtenant signed tenant context, install v1 (idempotent).
BEGIN;
-- One install at a time per database.
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgtenant.signed_context.install'));

DO $pgtenant$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{p}') THEN
        RAISE EXCEPTION 'pool role "{p}" does not exist: create it first';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{p}'
               AND (rolsuper OR rolbypassrls)) THEN
        RAISE WARNING 'pool role "{p}" is SUPERUSER or BYPASSRLS: row-level security does not bind it';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{o}') THEN
        CREATE ROLE {o} NOLOGIN;
    END IF;
    -- Nobody may act as the owner: it owns the keys.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
               JOIN pg_catalog.pg_roles r ON r.oid = m.roleid WHERE r.rolname = '{o}') THEN
        RAISE EXCEPTION 'role "{o}" has members; the context owner must have none';
    END IF;
    -- Never adopt a schema someone else prepared (it could hold their triggers or rules).
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
               WHERE n.nspname = '{s}'
                 AND n.nspowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = '{o}')) THEN
        RAISE EXCEPTION 'schema "{s}" exists and is not owned by "{o}"; refusing to take it over';
    END IF;
END
$pgtenant$;
-- INHERIT and pg_read_all_stats: the SECURITY DEFINER functions read the caller's
-- backend_start from pg_stat_get_activity(), which hides it from other roles otherwise.
ALTER ROLE {o} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    INHERIT CONNECTION LIMIT 0 PASSWORD NULL;
GRANT pg_read_all_stats TO {o};

-- Goes into the first schema of the admin's search_path when missing; the functions
-- below call it schema-qualified through {s}._hmac, resolved now.
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {o};
ALTER SCHEMA {s} OWNER TO {o};
REVOKE ALL ON SCHEMA {s} FROM PUBLIC;
GRANT USAGE ON SCHEMA {s} TO {p};

CREATE TABLE IF NOT EXISTS {s}.context_keys (
    key_id text PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9_.-]{{1,64}}$'),
    secret bytea NOT NULL CHECK (octet_length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
ALTER TABLE {s}.context_keys OWNER TO {o};
REVOKE ALL ON TABLE {s}.context_keys FROM PUBLIC, {p};

-- UNLOGGED: no WAL, emptied by crash recovery (every backend is gone then anyway).
-- fillfactor 50 keeps the per-pin UPDATE on the same page (HOT).
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.backend_context (
    pid integer NOT NULL,
    backend_start timestamptz NOT NULL,
    seq bigint NOT NULL,
    tenant text,
    expires_at timestamptz,
    key_id text,
    PRIMARY KEY (pid, backend_start)
) WITH (fillfactor = 50);
ALTER TABLE {s}.backend_context OWNER TO {o};
REVOKE ALL ON TABLE {s}.backend_context FROM PUBLIC, {p};

-- HMAC-SHA256 through pgcrypto, wherever it is installed (looked up here, written into
-- the body schema-qualified, so no search_path can substitute another hmac()).
DO $pgtenant$
DECLARE
    ext_schema name;
BEGIN
    SELECT n.nspname INTO STRICT ext_schema
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pgcrypto';
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE FUNCTION {s}._hmac(msg bytea, secret bytea) RETURNS bytea '
        'LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS %L',
        pg_catalog.format('SELECT %I.hmac(msg, secret, %L::text)', ext_schema, 'sha256'));
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO {o}', ext_schema);
END
$pgtenant$;
ALTER FUNCTION {s}._hmac(bytea, bytea) OWNER TO {o};
REVOKE ALL ON FUNCTION {s}._hmac(bytea, bytea) FROM PUBLIC;

-- enter(tenant, seq, exp, key_id, mac): sets this backend's tenant when mac is
-- HMAC-SHA256(secret of key_id, 'v1|' || tenant || '|' || pid || '|' ||
-- backend_start_micros || '|' || seq || '|' || exp), exp (Unix seconds) is in the
-- future, the key is not retired, and seq is greater than every seq accepted before
-- on this backend. Any failure: SQLSTATE 28000, context unchanged.
CREATE OR REPLACE FUNCTION {s}.enter(
    p_tenant text, p_seq bigint, p_exp bigint, p_key_id text, p_mac text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $pgtenant$
DECLARE
    v_pid integer := pg_catalog.pg_backend_pid();
    v_start timestamptz;
    v_secret bytea;
    v_expected bytea;
    v_last bigint;
BEGIN
    IF p_tenant IS NULL OR p_seq IS NULL OR p_exp IS NULL OR p_key_id IS NULL
       OR p_mac IS NULL OR p_tenant = '' OR pg_catalog.octet_length(p_tenant) > {max}
       OR p_mac !~ '^[0-9a-f]{{64}}$' OR p_exp > {MAX_EXP_UNIX} THEN
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: malformed proof';
    END IF;
    SELECT a.backend_start INTO v_start
    FROM pg_catalog.pg_stat_get_activity(v_pid) AS a;
    IF v_start IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: backend start time not visible',
            HINT = 'the owner role of {s} needs INHERIT and membership in pg_read_all_stats';
    END IF;
    SELECT k.secret INTO v_secret
    FROM {s}.context_keys AS k
    WHERE k.key_id = p_key_id
      AND (k.retired_at IS NULL OR k.retired_at > pg_catalog.clock_timestamp());
    IF v_secret IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: unknown or retired key';
    END IF;
    v_expected := {s}._hmac(pg_catalog.convert_to(
        'v1|' || p_tenant
        || '|' || v_pid::text
        || '|' || ((EXTRACT(epoch FROM v_start) * 1000000)::bigint)::text
        || '|' || p_seq::text
        || '|' || p_exp::text, 'UTF8'), v_secret);
    -- Compared under a second HMAC so the comparison's timing says nothing about the MAC.
    IF {s}._hmac(v_expected, v_secret)
       IS DISTINCT FROM {s}._hmac(pg_catalog.decode(p_mac, 'hex'), v_secret) THEN
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: bad signature';
    END IF;
    IF p_exp <= EXTRACT(epoch FROM pg_catalog.clock_timestamp()) THEN
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: proof expired';
    END IF;
    SELECT c.seq INTO v_last
    FROM {s}.backend_context AS c
    WHERE c.pid = v_pid AND c.backend_start = v_start;
    IF v_last IS NULL THEN
        -- First proof on this backend: rows of earlier backends with this pid are dead.
        DELETE FROM {s}.backend_context AS c
        WHERE c.pid = v_pid AND c.backend_start <> v_start;
        INSERT INTO {s}.backend_context (pid, backend_start, seq, tenant, expires_at, key_id)
        VALUES (v_pid, v_start, p_seq, p_tenant, pg_catalog.to_timestamp(p_exp), p_key_id);
    ELSIF p_seq > v_last THEN
        UPDATE {s}.backend_context AS c
        SET seq = p_seq, tenant = p_tenant,
            expires_at = pg_catalog.to_timestamp(p_exp), key_id = p_key_id
        WHERE c.pid = v_pid AND c.backend_start = v_start;
    ELSE
        RAISE EXCEPTION USING ERRCODE = '28000',
            MESSAGE = 'pgtenant: tenant context refused: sequence not increasing';
    END IF;
END
$pgtenant$;

-- The tenant of this backend, or NULL. Requires: this backend's row (pid and start
-- time), not expired, and the row version is the latest one (xmax = 0): a snapshot
-- imported with SET TRANSACTION SNAPSHOT could otherwise show an older version of this
-- backend's row, i.e. the tenant this backend served before. PARALLEL RESTRICTED: a
-- parallel worker has another pid, so only the leader may evaluate it.
CREATE OR REPLACE FUNCTION {s}.current_tenant()
RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $pgtenant$
DECLARE
    v_tenant text;
BEGIN
    -- plpgsql, not sql: its plan is cached for the session (a SQL function body is
    -- planned again in every query, about 40 us more per call).
    SELECT c.tenant INTO v_tenant
    FROM {s}.backend_context AS c
    WHERE c.pid = pg_catalog.pg_backend_pid()
      AND c.backend_start = (SELECT a.backend_start
                             FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) AS a)
      AND c.expires_at > pg_catalog.clock_timestamp()
      AND c.xmax = '0'::xid;
    RETURN v_tenant;
END
$pgtenant$;

-- Clears this backend's tenant. Keeps the row and its seq: deleting it would let an
-- older proof for this backend be accepted again.
CREATE OR REPLACE FUNCTION {s}.leave()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $pgtenant$
BEGIN
    UPDATE {s}.backend_context AS c
    SET tenant = NULL, expires_at = NULL, key_id = NULL
    WHERE c.pid = pg_catalog.pg_backend_pid()
      AND c.tenant IS NOT NULL;
END
$pgtenant$;

-- What the proxy signs for this backend; read once per server connection.
CREATE OR REPLACE FUNCTION {s}.backend_identity()
RETURNS TABLE (pid integer, backend_start_micros bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $pgtenant$
BEGIN
    RETURN QUERY
    SELECT a.pid, (EXTRACT(epoch FROM a.backend_start) * 1000000)::bigint
    FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) AS a;
END
$pgtenant$;
"#
    );
    for f in FUNCTIONS {
        let _ = write!(
            sql,
            "ALTER FUNCTION {s}.{f} OWNER TO {o};\n\
             REVOKE ALL ON FUNCTION {s}.{f} FROM PUBLIC;\n\
             GRANT EXECUTE ON FUNCTION {s}.{f} TO {p};\n"
        );
    }
    sql.push_str("COMMIT;\n");
    Ok(sql)
}

/// The functions the pool role may execute, with their signatures.
pub const FUNCTIONS: [&str; 4] = [
    "enter(text, bigint, bigint, text, text)",
    "current_tenant()",
    "leave()",
    "backend_identity()",
];

/// The policy form for a tenant table (`table` schema-qualified if needed; names checked).
/// The sub-select makes `current_tenant()` one evaluation per query (an InitPlan).
pub fn policy_sql(schema: &str, table: &str, column: &str) -> anyhow::Result<String> {
    ident("schema", schema)?;
    for part in table.split('.') {
        plain_name("table", part)?;
    }
    plain_name("column", column)?;
    let ctx = format!("(SELECT {schema}.current_tenant())");
    Ok(format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;\n\
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY;\n\
         CREATE POLICY pgtenant_isolation ON {table}\n    \
         USING ({column} = {ctx})\n    \
         WITH CHECK ({column} = {ctx});\n"
    ))
}

/// `SELECT <schema>.enter($1,$2,$3,$4,$5)`: tenant, seq, exp, key id, MAC as bind parameters.
pub fn enter_sql(schema: &str) -> String {
    format!("SELECT {schema}.enter($1,$2,$3,$4,$5)")
}

/// `SELECT <schema>.leave()`.
pub fn leave_sql(schema: &str) -> String {
    format!("SELECT {schema}.leave()")
}

/// `SELECT pid, backend_start_micros FROM <schema>.backend_identity()`.
pub fn identity_sql(schema: &str) -> String {
    format!("SELECT pid, backend_start_micros FROM {schema}.backend_identity()")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_names("pgtenant", "pgtenant_ctx_owner", "pgtenant").is_ok());
        assert!(check_names("pgtenant", "same", "same").is_err());
        for bad in ["", "Upper", "a;b", "a\"b", "1a", "pg_x", "public", "a b"] {
            assert!(ident("schema", bad).is_err(), "{bad:?} accepted");
        }
        assert!(ident("schema", &"a".repeat(64)).is_err());
        assert!(install_sql("x;drop", "o", "p").is_err());
    }

    #[test]
    fn statements_use_only_placeholders() {
        assert_eq!(
            enter_sql("pgtenant"),
            "SELECT pgtenant.enter($1,$2,$3,$4,$5)"
        );
        assert_eq!(leave_sql("s"), "SELECT s.leave()");
        let policy = policy_sql("pgtenant", "public.t", "tenant_id").unwrap();
        assert!(policy.contains("USING (tenant_id = (SELECT pgtenant.current_tenant()))"));
        assert!(policy.contains("WITH CHECK (tenant_id = (SELECT pgtenant.current_tenant()))"));
        assert!(policy.contains("FORCE ROW LEVEL SECURITY"));
    }

    #[test]
    fn every_security_definer_function_pins_search_path() {
        let sql = install_sql("pgtenant", DEFAULT_OWNER, "pool").unwrap();
        let definers = sql.matches(" SECURITY DEFINER PARALLEL ").count();
        assert_eq!(definers, 4);
        assert_eq!(
            sql.matches("SET search_path = pg_catalog, pg_temp").count(),
            definers
        );
        for f in FUNCTIONS {
            assert!(sql.contains(&format!("GRANT EXECUTE ON FUNCTION pgtenant.{f} TO pool;")));
        }
    }
}
