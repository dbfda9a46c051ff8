//! The audit table: its DDL, the insert-only writer role, and `pgtenant audit init`.
//!
//! The table is a product surface: compliance teams query it directly ("what did tenant X do
//! between T1 and T2"), so its columns keep the names of the seed's `audit_tenant_access` and
//! carry comments. The proxy writes through a role that may only INSERT: with the audit
//! credentials alone, nobody can read, change or remove the trail.
//!
//! Names: an unqualified table name means `public.<name>`. The DDL, the grants and the
//! shipper's INSERT all use the schema-qualified, double-quoted name, so the row never lands
//! somewhere else through a different `search_path`. Quoted names are case-sensitive as
//! written in the config.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use tokio_postgres::{Client, GenericClient};

use crate::pool::UpstreamTarget;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
const MAX_IDENT_BYTES: usize = 63;
/// Schema of tables named without one.
const DEFAULT_SCHEMA: &str = "public";

/// Refusals and bad input of this module. I/O errors travel as `anyhow` context.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0:?} is not a usable role name (1 to 63 bytes, no NUL)")]
    RoleName(String),
    #[error("audit url: {0}")]
    AuditUrl(String),
    #[error("refusing role {role:?} as the audit writer: {why}")]
    Refused { role: String, why: String },
}

/// A validated table name (optionally schema-qualified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= MAX_IDENT_BYTES
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        match parts.as_slice() {
            [name] if ok(name) => Ok(TableName {
                schema: None,
                name: name.to_string(),
            }),
            [schema, name] if ok(schema) && ok(name) => Ok(TableName {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            }),
            _ => Err(format!(
                "{s:?} is not a table name (letters, digits, _; optionally schema.table)"
            )),
        }
    }

    /// The schema the table lives in (`public` when none was given).
    pub fn schema_or_default(&self) -> &str {
        self.schema.as_deref().unwrap_or(DEFAULT_SCHEMA)
    }

    /// `"schema"."name"`, for embedding in SQL.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(self.schema_or_default()),
            quote_ident(&self.name)
        )
    }

    /// Name of the UNIQUE (event_instance, event_seq) constraint, unquoted. The shipper's
    /// `ON CONFLICT DO NOTHING` relies on it: without it replays would be stored twice.
    pub fn event_key(&self) -> String {
        self.index_base("event_key")
    }

    fn index_base(&self, suffix: &str) -> String {
        let keep = MAX_IDENT_BYTES.saturating_sub(suffix.len() + 1);
        format!("{}_{suffix}", &self.name[..self.name.len().min(keep)])
    }

    /// A quoted index name derived from the table name, within the 63-byte limit (the table
    /// part is shortened, the suffix kept, so two indexes never truncate to one name).
    fn index_name(&self, suffix: &str) -> String {
        quote_ident(&self.index_base(suffix))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema_or_default(), self.name)
    }
}

/// Double-quotes an identifier (always; embedded quotes doubled). Callers make sure it
/// holds no NUL and fits 63 bytes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal that means the same with `standard_conforming_strings` on or off.
pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// A role name `quote_ident` can embed: 1 to 63 bytes, no NUL.
pub fn check_role(role: &str) -> Result<(), SchemaError> {
    if role.is_empty() || role.len() > MAX_IDENT_BYTES || role.contains('\0') {
        return Err(SchemaError::RoleName(role.to_owned()));
    }
    Ok(())
}

/// Column comments: the columns compliance queries filter and read first.
const COLUMN_COMMENTS: &[(&str, &str)] = &[
    (
        "id",
        "Row id (random). Not an event key: see event_instance, event_seq.",
    ),
    (
        "tenant_id",
        "Tenant of the session. NULL when authentication failed before a tenant was known.",
    ),
    (
        "user_id",
        "Subject of the session's token (JWT sub). NULL when unknown.",
    ),
    (
        "table_name",
        "The table the statement writes, else the first it reads (schema-qualified as written). NULL when it names none.",
    ),
    (
        "operation",
        "SELECT, INSERT, UPDATE, DELETE, ... for statements; CONNECT, DISCONNECT, AUTHENTICATE for session events.",
    ),
    (
        "success",
        "Whether the access succeeded (statement ran, session authenticated).",
    ),
    (
        "access_time",
        "When the event happened, as seen by the proxy.",
    ),
    ("client_ip", "Client address as seen by the proxy."),
    ("user_agent", "The client's application_name."),
    (
        "event",
        "session_start, session_end, auth_failure, session_refused, statement or blocked.",
    ),
    (
        "event_instance",
        "Id of the proxy instance that recorded the event; with event_seq the unique event key.",
    ),
    (
        "event_seq",
        "Sequence number of the event within event_instance.",
    ),
    ("tables", "Every table the statement names."),
    ("sqlstate", "SQLSTATE of the failure, if any."),
    (
        "fingerprint",
        "Normalized statement fingerprint; holds no literals.",
    ),
    (
        "statement",
        "Statement text, only when log_statement_text is on; truncated.",
    ),
    (
        "reason",
        "Why: an authentication failure reason, a guard rule, a refusal label.",
    ),
    (
        "token_sha256",
        "SHA-256 prefix of the presented token (never the token): correlates retries.",
    ),
];

/// Idempotent DDL of the audit table and its indexes (no transaction control of its own).
/// The event key is the primary key, checked by name in `init`.
///
/// Deviations from the seed's `audit_tenant_access`: `tenant_id`, `user_id`, `table_name` and
/// `operation` are nullable (an auth failure has no tenant, session events and many statements
/// name no table); `access_time` is `timestamptz NOT NULL` (an audit time without a zone is
/// ambiguous); `id` keeps its random default but is not indexed: the event key is the primary
/// key, because every index costs each of the (many) inserts, and a random uuid index the most
/// (measured: 21.8 → 9.1 µs per row with this layout and plain INSERTs). `access_time` alone
/// gets a BRIN index: rows arrive in time order. The other columns are the fields of
/// [`super::AuditRecord`].
pub fn table_sql(table: &TableName) -> String {
    let t = table.quoted();
    let mut sql = String::new();
    if let Some(schema) = &table.schema {
        sql.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};\n",
            quote_ident(schema)
        ));
    }
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant_id varchar(255),
    user_id varchar(255),
    table_name varchar(255),
    operation varchar(50),
    success boolean NOT NULL,
    access_time timestamptz NOT NULL DEFAULT now(),
    client_ip inet,
    user_agent text,
    event text NOT NULL,
    event_instance text NOT NULL,
    event_seq bigint NOT NULL,
    session_id bigint,
    upstream text,
    client_port integer,
    tables text[],
    sqlstate text,
    command_tag text,
    rows bigint,
    duration_us bigint,
    fingerprint text,
    statement text,
    reason text,
    token_kid text,
    token_jti text,
    token_sha256 text,
    client_bytes bigint,
    server_bytes bigint,
    statements bigint,
    CONSTRAINT {key} PRIMARY KEY (event_instance, event_seq)
);
CREATE INDEX IF NOT EXISTS {tenant} ON {t} (tenant_id, access_time);
CREATE INDEX IF NOT EXISTS {user} ON {t} (user_id, access_time);
CREATE INDEX IF NOT EXISTS {time} ON {t} USING brin (access_time);
COMMENT ON TABLE {t} IS {comment};
",
        key = quote_ident(&table.event_key()),
        tenant = table.index_name("tenant_time_idx"),
        user = table.index_name("user_time_idx"),
        time = table.index_name("time_idx"),
        comment = quote_literal(
            "pgtenant audit trail: one row per session event or statement. Append-only: \
             the proxy's writer role may only INSERT."
        ),
    ));
    for (column, comment) in COLUMN_COMMENTS {
        sql.push_str(&format!(
            "COMMENT ON COLUMN {t}.{} IS {};\n",
            quote_ident(column),
            quote_literal(comment)
        ));
    }
    sql
}

/// The writer role may only INSERT: every other privilege on the table is revoked from it and
/// from PUBLIC, then INSERT and USAGE on the schema are granted. Idempotent.
pub fn grants_sql(table: &TableName, writer_role: &str) -> String {
    let t = table.quoted();
    let w = quote_ident(writer_role);
    format!(
        "REVOKE ALL ON TABLE {t} FROM PUBLIC, {w};
GRANT INSERT ON TABLE {t} TO {w};
GRANT USAGE ON SCHEMA {schema} TO {w};
",
        schema = quote_ident(table.schema_or_default())
    )
}

/// What `init` did, for the operator. Holds no password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub database: String,
    pub table: String,
    pub writer_role: String,
    pub database_created: bool,
    pub role_created: bool,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let made = |b: bool| if b { "created" } else { "existed" };
        write!(
            f,
            "database {:?} ({}): table {} ready, writer role {:?} ({}) may only INSERT",
            self.database,
            made(self.database_created),
            self.table,
            self.writer_role,
            made(self.role_created),
        )
    }
}

/// Sets up the audit table in the database of `audit_url` and its user as the insert-only
/// writer. Connects with `admin_url`'s host and credentials (URL or key=value; TLS with
/// `sslmode=require`) to that database, creating the database if it is missing. Creates the
/// role (LOGIN, the URL's password sent as a SCRAM verifier, so the server never sees or logs
/// it) if it does not exist; an existing role keeps its password. One transaction: a refusal
/// changes nothing. Running it again succeeds and re-asserts the grants.
///
/// Refuses writer roles that could remove rows: superusers, roles with BYPASSRLS, the admin
/// role itself, owners (or members of the owner) of the table or its schema, and roles that
/// hold SELECT, UPDATE, DELETE or TRUNCATE on the table some other way after the grants.
pub async fn init(
    admin_url: &str,
    audit_url: &str,
    table: &TableName,
) -> anyhow::Result<InitReport> {
    let target = UpstreamTarget::from_url(audit_url).map_err(SchemaError::AuditUrl)?;
    check_role(&target.user)?;
    let admin = tokio_postgres::Config::from_str(admin_url).context("admin url")?;
    let (mut client, database_created) = connect_creating_db(&admin, &target.database).await?;
    let tx = client.transaction().await?;
    let role_created = ensure_role(&tx, &target).await?;
    tx.batch_execute(&table_sql(table))
        .await
        .with_context(|| format!("creating {table}"))?;
    require_event_key(&tx, table).await?;
    refuse_owner(&tx, &target.user, table).await?;
    tx.batch_execute(&grants_sql(table, &target.user))
        .await
        .with_context(|| format!("granting INSERT on {table}"))?;
    // Tenant databases often revoke CONNECT from PUBLIC; the writer needs it (and nothing
    // else at the database level).
    tx.batch_execute(&format!(
        "GRANT CONNECT ON DATABASE {} TO {}",
        quote_ident(&target.database),
        quote_ident(&target.user)
    ))
    .await
    .with_context(|| format!("granting CONNECT on database {:?}", target.database))?;
    refuse_extra_privileges(&tx, &target.user, table).await?;
    tx.commit().await.context("committing the audit setup")?;
    Ok(InitReport {
        database: target.database,
        table: table.to_string(),
        writer_role: target.user,
        database_created,
        role_created,
    })
}

/// Connects to `database` with the admin settings; creates it first if it does not exist.
async fn connect_creating_db(
    admin: &tokio_postgres::Config,
    database: &str,
) -> anyhow::Result<(Client, bool)> {
    let mut cfg = admin.clone();
    cfg.dbname(database);
    match super::ship::connect(&cfg).await {
        Ok(client) => return Ok((client, false)),
        Err(e) if e.code() != Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
            return Err(e).with_context(|| format!("admin connection to database {database:?}"))
        }
        Err(_) => {}
    }
    let outer = super::ship::connect(admin)
        .await
        .context("admin connection (to create the audit database)")?;
    outer
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(database)))
        .await
        .with_context(|| format!("creating database {database:?}"))?;
    let client = super::ship::connect(&cfg)
        .await
        .with_context(|| format!("admin connection to database {database:?}"))?;
    Ok((client, true))
}

/// Creates the writer role if missing; refuses one with powers beyond INSERT. Returns whether
/// it was created.
async fn ensure_role(tx: &impl GenericClient, target: &UpstreamTarget) -> anyhow::Result<bool> {
    let role = &target.user;
    let refused = |why: &str| SchemaError::Refused {
        role: role.clone(),
        why: why.to_owned(),
    };
    let me: String = tx.query_one("SELECT current_user::text", &[]).await?.get(0);
    if &me == role {
        return Err(refused("it is the admin role; the writer must be a role of its own").into());
    }
    let row = tx
        .query_opt(
            "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[role],
        )
        .await?;
    let Some(row) = row else {
        let password = match &target.password {
            Some(pw) => format!(
                " PASSWORD {}",
                quote_literal(&postgres_protocol::password::scram_sha_256(pw.as_bytes()))
            ),
            None => String::new(),
        };
        tx.batch_execute(&format!(
            "CREATE ROLE {} LOGIN{password}",
            quote_ident(role)
        ))
        .await
        .with_context(|| format!("creating role {role:?}"))?;
        return Ok(true);
    };
    if row.get::<_, bool>(0) {
        return Err(refused("it is a superuser and could delete audit rows").into());
    }
    if row.get::<_, bool>(1) {
        return Err(refused("it has BYPASSRLS; the writer needs no special attributes").into());
    }
    if !row.get::<_, bool>(2) {
        tx.batch_execute(&format!("ALTER ROLE {} LOGIN", quote_ident(role)))
            .await?;
    }
    Ok(false)
}

/// A table that existed before (`CREATE TABLE IF NOT EXISTS` kept it) must have the event-key
/// constraint: the shipper's `ON CONFLICT DO NOTHING` absorbs replays only through it.
async fn require_event_key(tx: &impl GenericClient, table: &TableName) -> anyhow::Result<()> {
    let found = tx
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_constraint
             WHERE conrelid = $1::text::regclass AND conname = $2 AND contype IN ('p', 'u')",
            &[&table.quoted(), &table.event_key()],
        )
        .await?;
    if found.is_none() {
        bail!(
            "{table} exists without the (event_instance, event_seq) key constraint {:?}; \
             it was not created by pgtenant (compare with `pgtenant audit sql`)",
            table.event_key()
        );
    }
    Ok(())
}

/// The owner of the table (or of its schema) can drop it or grant itself anything.
async fn refuse_owner(
    tx: &impl GenericClient,
    role: &str,
    table: &TableName,
) -> anyhow::Result<()> {
    let row = tx
        .query_one(
            "SELECT pg_catalog.pg_has_role($1, c.relowner, 'USAGE'),
                    pg_catalog.pg_has_role($1, n.nspowner, 'USAGE')
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = $2::text::regclass",
            &[&role, &table.quoted()],
        )
        .await?;
    let why = if row.get::<_, bool>(0) {
        "it owns (or is a member of the owner of) the audit table"
    } else if row.get::<_, bool>(1) {
        "it owns (or is a member of the owner of) the audit table's schema"
    } else {
        return Ok(());
    };
    Err(SchemaError::Refused {
        role: role.to_owned(),
        why: why.to_owned(),
    }
    .into())
}

/// After the grants: INSERT only, whatever other roles the writer is a member of.
async fn refuse_extra_privileges(
    tx: &impl GenericClient,
    role: &str,
    table: &TableName,
) -> anyhow::Result<()> {
    let quoted = table.quoted();
    for privilege in ["SELECT", "UPDATE", "DELETE", "TRUNCATE"] {
        let has: bool = tx
            .query_one(
                "SELECT pg_catalog.has_table_privilege($1, $2, $3)",
                &[&role, &quoted, &privilege],
            )
            .await?
            .get(0);
        if has {
            return Err(SchemaError::Refused {
                role: role.to_owned(),
                why: format!("it still has {privilege} on the table (through another role?)"),
            }
            .into());
        }
    }
    let can_insert: bool = tx
        .query_one(
            "SELECT pg_catalog.has_table_privilege($1, $2, 'INSERT')",
            &[&role, &quoted],
        )
        .await?
        .get(0);
    if !can_insert {
        bail!("role {role:?} cannot INSERT into {table} after the grants");
    }
    Ok(())
}

/// `init` for every audit database of a config: the central one, and with `sink = "tenant"`
/// each dedicated upstream's `audit_url`. Stops at the first failure.
pub async fn init_config(
    config: &crate::config::Config,
    admin_url: &str,
) -> anyhow::Result<Vec<(String, InitReport)>> {
    let audit = config
        .audit
        .as_ref()
        .ok_or_else(|| anyhow!("the config has no [audit] section"))?;
    let table = TableName::parse(&audit.table).map_err(|e| anyhow!("audit.table: {e}"))?;
    let mut targets = vec![("[audit] url".to_owned(), audit.url.as_str())];
    if audit.sink == super::AuditSink::Tenant {
        for (name, up) in &config.upstreams {
            if let Some(url) = &up.audit_url {
                targets.push((format!("upstreams.{name}.audit_url"), url.as_str()));
            }
        }
    }
    let mut reports = Vec::with_capacity(targets.len());
    for (label, url) in targets {
        let report = init(admin_url, url, &table)
            .await
            .with_context(|| format!("audit init for {label}"))?;
        reports.push((label, report));
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_default_to_public() {
        let t = TableName::parse("audit_tenant_access").unwrap();
        assert_eq!(t.quoted(), "\"public\".\"audit_tenant_access\"");
        assert_eq!(t.to_string(), "public.audit_tenant_access");
        let t = TableName::parse("compliance.Trail").unwrap();
        assert_eq!(t.quoted(), "\"compliance\".\"Trail\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("a;b").is_err());
    }

    #[test]
    fn long_names_keep_distinct_index_names() {
        let t = TableName::parse(&"a".repeat(63)).unwrap();
        let names = [
            quote_ident(&t.event_key()),
            t.index_name("tenant_time_idx"),
            t.index_name("user_time_idx"),
            t.index_name("time_idx"),
        ];
        for n in &names {
            assert!(n.len() <= 63 + 2, "{n}");
        }
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn sql_has_every_record_column_and_the_event_key() {
        let t = TableName::parse("audit.trail").unwrap();
        let sql = table_sql(&t);
        assert!(sql.starts_with("CREATE SCHEMA IF NOT EXISTS \"audit\";"));
        let record = serde_json::to_value(crate::audit::tests::sample_record()).unwrap();
        for field in record.as_object().unwrap().keys() {
            let column = if field == "access_time_us" {
                "access_time"
            } else {
                field
            };
            assert!(
                sql.contains(&format!("\n    {column} ")),
                "{column} missing"
            );
        }
        assert!(
            sql.contains("CONSTRAINT \"trail_event_key\" PRIMARY KEY (event_instance, event_seq)")
        );
        let grants = grants_sql(&t, "aud\"it");
        assert!(
            grants.contains("REVOKE ALL ON TABLE \"audit\".\"trail\" FROM PUBLIC, \"aud\"\"it\";")
        );
        assert!(grants.contains("GRANT INSERT ON TABLE \"audit\".\"trail\" TO \"aud\"\"it\";"));
        assert!(check_role("").is_err() && check_role("a\0b").is_err());
    }
}
