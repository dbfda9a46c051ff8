//! The metadata database: one lazily made connection that runs the directory query, and the
//! reading of its answer into an [`Entry`].

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Connection, NoTls, Row as PgRow};

use crate::pool::UpstreamTarget;

/// `application_name` of pgtenant's connections to the metadata database.
pub const APPLICATION_NAME: &str = "pgtenant-directory";

/// What the directory says about one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// No row: the static `[tenants]` map (and default) decide.
    Absent,
    Found(DirRow),
}

/// One directory row, as the query named its columns. Absent columns read as NULL, except
/// `active`, which is true when the query has no such column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirRow {
    pub upstream: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    pub credentials: Option<String>,
    pub active: bool,
}

/// Why a lookup has no answer. Messages never contain the metadata database password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Connecting, the query, or the deadline failed: cached answers may still serve.
    #[error("{0}")]
    Unavailable(String),
    /// The query answered, but not in a shape pgtenant can use.
    #[error("{0}")]
    Invalid(String),
}

/// The query connection. `tokio_postgres::Client` pipelines concurrent queries, so one
/// connection serves every lookup; it is dropped after any error and made again on demand.
pub(super) struct MetadataDb {
    config: tokio_postgres::Config,
    /// host:port, for messages.
    pub addr: String,
    query: String,
    timeout: Duration,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl MetadataDb {
    pub fn new(url: &str, query: &str, timeout: Duration) -> Result<MetadataDb, String> {
        let addr = UpstreamTarget::from_url(url)
            .map_err(|e| format!("directory.url: {e}"))?
            .addr();
        Ok(MetadataDb {
            config: connect_config(url, timeout)?,
            addr,
            query: query.to_owned(),
            timeout,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs the query for `tenant` within the lookup timeout (connecting included).
    pub async fn fetch(&self, tenant: &str) -> Result<Entry, FetchError> {
        match tokio::time::timeout(self.timeout, self.fetch_unbounded(tenant)).await {
            Ok(result) => result,
            Err(_) => {
                self.forget_client().await;
                Err(FetchError::Unavailable(format!(
                    "no answer from the metadata database at {} within {:?}",
                    self.addr, self.timeout
                )))
            }
        }
    }

    async fn fetch_unbounded(&self, tenant: &str) -> Result<Entry, FetchError> {
        let client = self.client().await?;
        let rows = client
            .query_typed(&self.query, &[(&tenant, Type::TEXT)])
            .await
            .map_err(|e| {
                // Some errors come from the server on a healthy connection (a bad query);
                // either way the answer is missing, and a closed client is made again.
                FetchError::Unavailable(format!(
                    "directory query on {} failed: {}",
                    self.addr,
                    describe(&e)
                ))
            });
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                if client.is_closed() {
                    self.forget_client().await;
                }
                return Err(e);
            }
        };
        entry_from_rows(&rows)
    }

    async fn client(&self) -> Result<Arc<Client>, FetchError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        *slot = None;
        let client = connect(&self.config).await.map_err(|e| {
            FetchError::Unavailable(format!(
                "cannot connect to the metadata database at {}: {e}",
                self.addr
            ))
        })?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }
}

/// The tokio-postgres config for `url`, with pgtenant's application name and `timeout` as
/// the connect timeout.
pub(super) fn connect_config(
    url: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|_| "directory.url is not a valid PostgreSQL connection URL".to_string())?;
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    Ok(config)
}

/// A query client whose connection task ends when the client is dropped.
async fn connect(config: &tokio_postgres::Config) -> Result<Client, String> {
    if config.get_ssl_mode() == SslMode::Require {
        let tls = crate::pool::encrypt_only_client_config().map_err(|e| e.to_string())?;
        let (client, conn) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await
            .map_err(|e| describe(&e))?;
        spawn_connection(conn);
        Ok(client)
    } else {
        let (client, conn) = config.connect(NoTls).await.map_err(|e| describe(&e))?;
        spawn_connection(conn);
        Ok(client)
    }
}

fn spawn_connection<S, T>(conn: Connection<S, T>)
where
    Connection<S, T>:
        std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %describe(&e), "directory query connection closed");
        }
    });
}

/// A tokio-postgres error with its server message and SQLSTATE when there is one (its
/// `Display` alone says only "db error"). Holds no password: tokio-postgres never echoes one.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Zero rows: absent; one: found; more: an error (the query must identify one tenant).
pub(super) fn entry_from_rows(rows: &[PgRow]) -> Result<Entry, FetchError> {
    match rows {
        [] => Ok(Entry::Absent),
        [row] => read_row(row).map(Entry::Found),
        more => Err(FetchError::Invalid(format!(
            "the directory query returned {} rows for one tenant",
            more.len()
        ))),
    }
}

fn read_row(row: &PgRow) -> Result<DirRow, FetchError> {
    let has = |name: &str| row.columns().iter().any(|c| c.name() == name);
    let text = |name: &str| -> Result<Option<String>, FetchError> {
        if !has(name) {
            return Ok(None);
        }
        let value: Option<String> = row.try_get(name).map_err(|_| bad_type(name, "text"))?;
        Ok(value.filter(|v| !v.is_empty()))
    };
    let active = if has("active") {
        // NULL is not "active": a row that does not say so lets nobody in.
        row.try_get::<_, Option<bool>>("active")
            .map_err(|_| bad_type("active", "boolean"))?
            .unwrap_or(false)
    } else {
        true
    };
    Ok(DirRow {
        upstream: text("upstream")?,
        host: text("host")?,
        port: read_port(row, has("port"))?,
        database: text("database")?,
        credentials: text("credentials")?,
        active,
    })
}

fn read_port(row: &PgRow, present: bool) -> Result<Option<u16>, FetchError> {
    if !present {
        return Ok(None);
    }
    let wide: Option<i64> = match row.columns().iter().find(|c| c.name() == "port") {
        Some(c) if *c.type_() == Type::INT2 => row
            .try_get::<_, Option<i16>>("port")
            .ok()
            .flatten()
            .map(i64::from),
        Some(c) if *c.type_() == Type::INT4 => row
            .try_get::<_, Option<i32>>("port")
            .ok()
            .flatten()
            .map(i64::from),
        Some(c) if *c.type_() == Type::INT8 => row.try_get::<_, Option<i64>>("port").ok().flatten(),
        Some(c) if *c.type_() == Type::TEXT || *c.type_() == Type::VARCHAR => {
            match row.try_get::<_, Option<String>>("port").ok().flatten() {
                Some(s) => Some(s.trim().parse().map_err(|_| bad_type("port", "integer"))?),
                None => None,
            }
        }
        _ => return Err(bad_type("port", "integer")),
    };
    wide.map(|p| {
        u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            FetchError::Invalid(format!("the directory row's port {p} is not a TCP port"))
        })
    })
    .transpose()
}

fn bad_type(column: &str, wanted: &str) -> FetchError {
    FetchError::Invalid(format!(
        "the directory query's column \"{column}\" must be {wanted}"
    ))
}
