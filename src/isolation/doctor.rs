//! `pgtenant doctor`: inspects a shared upstream's database for misconfigurations that
//! would break tenant isolation (design/isolation.md, "Hardening checklist").
//!
//! It connects as the pool role (the upstream URL), so privileges are evaluated for exactly
//! the role tenants' SQL runs as, and reads the catalogs: role attributes and memberships,
//! schema and database privileges, role defaults, every table with the tenant column (RLS
//! enabled and forced, policies that compare the tenant column with the tenant context,
//! `CHECK (<col> <> '')`), views and materialized views over those tables, SECURITY DEFINER
//! functions, and in signed mode the context schema. It then probes each tenant table with
//! an unknown and an empty tenant context, in a read-only transaction: any row seen is a
//! hole the catalog heuristics missed. It never writes.
//!
//! - `catalog`: every check's id and severity ([`CHECKS`])
//! - `connect`: tokio-postgres connections with the upstream's TLS settings
//! - `roles`, `tables`, `signed`: the checks
//! - `render`: text and JSON reports
//!
//! Policy expressions are matched as text (`pg_get_expr` with `search_path = pg_catalog`):
//! "references the tenant context" is a heuristic, which is why the probe exists.

mod catalog;
mod connect;
mod objects;
mod policy_text;
mod probe;
mod render;
mod roles;
mod signed;
mod tables;

#[cfg(test)]
mod tests;

use std::fmt;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

pub use catalog::{by_id, Check, CHECKS};
pub use render::{has_fatal, render_json, render_text};

use crate::config::{Config, UpstreamConfig, UpstreamKind};

/// How bad a finding is; ordered, so `max()` gives the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Context, nothing to fix.
    Info,
    /// A weakness to review; does not by itself let a tenant cross into another's rows.
    Warning,
    /// Breaks isolation (or makes the upstream unusable): do not serve tenants from it.
    Fatal,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Fatal => "fatal",
        })
    }
}

/// One problem found on one upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// The upstream's name in the config.
    pub upstream: String,
    /// Stable id from [`CHECKS`], e.g. `pool_role_superuser`.
    pub check: &'static str,
    pub severity: Severity,
    /// The table, view, policy (`table.policy`), function, schema or role concerned.
    pub object: Option<String>,
    pub message: String,
    /// SQL to run (as the owner or a superuser), or advice.
    pub fix: Option<String>,
}

/// What to look for. `Default`: tenant column `tenant_id`, setting mode, no admin URL.
#[derive(Clone)]
pub struct DoctorOptions {
    /// Column that holds the tenant on shared tables. Default `tenant_id`.
    pub tenant_column: String,
    /// The signed-context schema (`Some("pgtenant")` when the context is signed); `None` when
    /// policies read the plain setting (`UpstreamConfig::tenant_setting`).
    pub signed_schema: Option<String>,
    /// A superuser (or equally privileged) connection string for the same server, as libpq
    /// accepts it; its database name is replaced by each upstream's. Used for the checks
    /// about roles other than the pool role (the signed context's owner); without it they run
    /// as the pool role, which works while the catalogs stay world-readable.
    pub admin_url: Option<String>,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            tenant_column: "tenant_id".to_owned(),
            signed_schema: None,
            admin_url: None,
        }
    }
}

impl fmt::Debug for DoctorOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DoctorOptions")
            .field("tenant_column", &self.tenant_column)
            .field("signed_schema", &self.signed_schema)
            .field("admin_url", &self.admin_url.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why an upstream could not be inspected. Messages never contain passwords.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("invalid doctor options: {0}")]
    Options(String),
    #[error("upstream {0} is not a shared upstream; the doctor checks shared upstreams only")]
    NotShared(String),
    #[error("upstream {upstream}: invalid url: {reason}")]
    Url { upstream: String, reason: String },
    #[error("upstream {upstream}: invalid admin url: {reason}")]
    AdminUrl { upstream: String, reason: String },
    #[error("upstream {upstream}: TLS: {reason}")]
    Tls { upstream: String, reason: String },
    #[error("upstream {upstream}: cannot connect: {source}")]
    Connect {
        upstream: String,
        source: tokio_postgres::Error,
    },
    #[error("upstream {upstream}: timed out connecting")]
    ConnectTimeout { upstream: String },
    /// The catalogs do not answer as PostgreSQL's do (hidden by a hardening script?).
    #[error("upstream {upstream}: {reason}")]
    Catalog { upstream: String, reason: String },
    #[error("upstream {upstream}: query for {step} failed: {source}")]
    Query {
        upstream: String,
        step: &'static str,
        source: tokio_postgres::Error,
    },
}

impl DoctorOptions {
    fn validate(&self) -> Result<(), DoctorError> {
        if self.tenant_column.is_empty() {
            return Err(DoctorError::Options("tenant_column is empty".into()));
        }
        if self.signed_schema.as_deref() == Some("") {
            return Err(DoctorError::Options("signed_schema is empty".into()));
        }
        Ok(())
    }
}

/// Connects as the pool role (upstream url) and runs every check; with `admin_url`, the
/// checks about other roles run on that connection instead.
///
/// Errors when the upstream is not shared, cannot be reached, or a catalog query fails;
/// problems found are `Ok` findings. Read-only: the probe runs in a READ ONLY transaction
/// that is rolled back.
pub async fn check_upstream(
    name: &str,
    upstream: &UpstreamConfig,
    opts: &DoctorOptions,
) -> Result<Vec<Finding>, DoctorError> {
    opts.validate()?;
    if upstream.kind != UpstreamKind::Shared {
        return Err(DoctorError::NotShared(name.to_owned()));
    }
    let pool = connect::connect_pool(name, upstream).await?;
    let admin = match &opts.admin_url {
        Some(url) => Some(connect::connect_admin(name, upstream, url).await?),
        None => None,
    };
    let role = roles::load_pool_role(name, &pool).await?;
    let mut ctx = Ctx {
        upstream: name,
        pool: &pool,
        admin: admin.as_ref(),
        opts,
        tenant_setting: &upstream.tenant_setting,
        role,
        findings: Vec::new(),
    };
    roles::check(&mut ctx).await?;
    let inventory = tables::check(&mut ctx).await?;
    if let Some(schema) = &opts.signed_schema {
        signed::check(&mut ctx, schema).await?;
    }
    let mut findings = vec![inspected(&ctx, &inventory)];
    findings.append(&mut ctx.findings);
    Ok(findings)
}

/// [`check_upstream`] on every shared upstream, in name order. An upstream that cannot be
/// inspected becomes an `upstream_unchecked` fatal finding, so the others are still checked.
/// Errors only on invalid options.
pub async fn check_config(cfg: &Config, opts: &DoctorOptions) -> Result<Vec<Finding>, DoctorError> {
    opts.validate()?;
    let mut findings = Vec::new();
    for (name, upstream) in &cfg.upstreams {
        if upstream.kind != UpstreamKind::Shared {
            continue;
        }
        match check_upstream(name, upstream, opts).await {
            Ok(mut found) => findings.append(&mut found),
            Err(e) => findings.push(Finding {
                upstream: name.clone(),
                check: catalog::UPSTREAM_UNCHECKED.id,
                severity: catalog::UPSTREAM_UNCHECKED.severity,
                object: None,
                message: e.to_string(),
                fix: Some("check the upstream url, that the server is up, and run again".into()),
            }),
        }
    }
    Ok(findings)
}

fn inspected(ctx: &Ctx<'_>, inv: &tables::Inventory) -> Finding {
    let context = match &ctx.opts.signed_schema {
        Some(schema) => format!("signed context {schema}.current_tenant()"),
        None => format!("setting {}", ctx.tenant_setting),
    };
    let admin = if ctx.admin.is_some() {
        ", with an admin connection"
    } else {
        ""
    };
    Finding {
        upstream: ctx.upstream.to_owned(),
        check: catalog::INSPECTED.id,
        severity: catalog::INSPECTED.severity,
        object: Some(ctx.role.database.clone()),
        message: format!(
            "connected as {} to database {} (PostgreSQL {}){admin}; tenant column {}, {context}; \
             {} tenant table(s) usable by the pool role, {} view(s) over tenant tables",
            ctx.role.name,
            ctx.role.database,
            ctx.role.server_version,
            ctx.opts.tenant_column,
            inv.tenant_tables,
            inv.views,
        ),
        fix: None,
    }
}

/// The pool role as its own session sees it.
#[derive(Debug, Clone)]
struct PoolRole {
    pub oid: u32,
    pub name: String,
    /// `quote_ident(name)`, for fix SQL.
    pub ident: String,
    pub superuser: bool,
    pub bypassrls: bool,
    pub createrole: bool,
    pub createdb: bool,
    pub replication: bool,
    pub database: String,
    pub database_ident: String,
    pub owns_database: bool,
    pub database_create: bool,
    pub database_temp: bool,
    /// `server_version_num`, e.g. 150018.
    pub version_num: i32,
    pub server_version: String,
}

/// State shared by the checks of one upstream.
struct Ctx<'a> {
    pub upstream: &'a str,
    pub pool: &'a Client,
    pub admin: Option<&'a Client>,
    pub opts: &'a DoctorOptions,
    pub tenant_setting: &'a str,
    pub role: PoolRole,
    pub findings: Vec<Finding>,
}

impl Ctx<'_> {
    /// Records a finding of `check` (its severity comes from the catalog).
    pub fn report(
        &mut self,
        check: &Check,
        object: Option<String>,
        message: String,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            upstream: self.upstream.to_owned(),
            check: check.id,
            severity: check.severity,
            object,
            message,
            fix,
        });
    }

    /// A catalog query as the pool role.
    pub async fn query(
        &self,
        step: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DoctorError> {
        query(self.upstream, self.pool, step, sql, params).await
    }

    /// A catalog query about other roles: on the admin connection when there is one.
    pub async fn query_privileged(
        &self,
        step: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DoctorError> {
        query(
            self.upstream,
            self.admin.unwrap_or(self.pool),
            step,
            sql,
            params,
        )
        .await
    }
}

async fn query(
    upstream: &str,
    client: &Client,
    step: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, DoctorError> {
    client
        .query(sql, params)
        .await
        .map_err(|source| DoctorError::Query {
            upstream: upstream.to_owned(),
            step,
            source,
        })
}
