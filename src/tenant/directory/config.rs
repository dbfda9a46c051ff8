//! `[directory]`: where the tenant directory lives, how long answers are trusted, and the
//! credentials that directory rows may refer to.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{UpstreamConfig, UpstreamKind};
use crate::pool::UpstreamTarget;

/// The live tenant directory: a query against a metadata database that says where a tenant
/// goes. Reloadable; a reload that leaves this section (and the template upstream) unchanged
/// keeps the running directory, its cache and its LISTEN connection.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The metadata database, `postgres://user:password@host:port/dbname` (`${VAR}` expanded;
    /// `?sslmode=require` for TLS without certificate verification).
    pub url: String,
    /// The lookup, with the tenant id as `$1` (text). Named columns, each optional:
    /// `upstream` (a configured upstream), or `host`, `port`, `database`, `credentials` (a
    /// dedicated database; NULL host/port/credentials come from `template`), and `active`.
    pub query: String,
    /// How long an answer is used without asking again. Default 30s.
    #[serde(with = "humantime_serde", default = "DirectoryConfig::default_ttl")]
    pub ttl: Duration,
    /// How long "no row for this tenant" is remembered. Default 5s.
    #[serde(
        with = "humantime_serde",
        default = "DirectoryConfig::default_negative_ttl"
    )]
    pub negative_ttl: Duration,
    /// While the metadata database is unreachable, an answer keeps serving until it is this
    /// old; then lookups fail closed (57P03). Default 5m.
    #[serde(
        with = "humantime_serde",
        default = "DirectoryConfig::default_max_staleness"
    )]
    pub max_staleness: Duration,
    /// Deadline of one lookup, connecting included. Default 2s.
    #[serde(
        with = "humantime_serde",
        default = "DirectoryConfig::default_lookup_timeout"
    )]
    pub lookup_timeout: Duration,
    /// LISTEN channel: a NOTIFY payload names the tenant to forget; empty or `*` forgets all.
    /// Default `pgtenant_directory`.
    #[serde(default = "DirectoryConfig::default_channel")]
    pub channel: String,
    /// A `kind = "dedicated"` upstream whose settings (pool size, timeouts, TLS, user and
    /// password) databases described by directory rows inherit.
    pub template: Option<String>,
    /// `[directory.credentials.<ref>]`: the login a row's `credentials` column names.
    #[serde(default)]
    pub credentials: BTreeMap<String, DirectoryCredentials>,
}

/// A login for directory-described databases. `Debug` never shows the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DirectoryCredentials {
    pub user: String,
    /// `${VAR}` expansion applies, as everywhere in the file.
    pub password: Option<String>,
}

impl DirectoryConfig {
    fn default_ttl() -> Duration {
        Duration::from_secs(30)
    }
    fn default_negative_ttl() -> Duration {
        Duration::from_secs(5)
    }
    fn default_max_staleness() -> Duration {
        Duration::from_secs(300)
    }
    fn default_lookup_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn default_channel() -> String {
        "pgtenant_directory".into()
    }

    /// Checks the section against the configured upstreams. Messages never contain passwords.
    pub fn validate(&self, upstreams: &BTreeMap<String, UpstreamConfig>) -> Result<(), String> {
        UpstreamTarget::from_url(&self.url).map_err(|e| format!("directory.url: {e}"))?;
        self.url
            .parse::<tokio_postgres::Config>()
            .map_err(|_| "directory.url is not a valid PostgreSQL connection URL".to_string())?;
        if self.query.trim().is_empty() {
            return Err("directory.query must not be empty".into());
        }
        if !self.query.contains("$1") {
            return Err("directory.query must use the tenant id as $1".into());
        }
        if self.lookup_timeout.is_zero() {
            return Err("directory.lookup_timeout must be above zero".into());
        }
        if self.channel.is_empty() || self.channel.len() > 63 || self.channel.contains('\0') {
            return Err("directory.channel must be 1 to 63 bytes".into());
        }
        if let Some(name) = &self.template {
            match upstreams.get(name) {
                None => {
                    return Err(format!(
                        "directory.template names unknown upstream {name:?}"
                    ))
                }
                Some(up) if up.kind != UpstreamKind::Dedicated => {
                    return Err(format!(
                        "directory.template: upstream {name:?} must be kind = \"dedicated\""
                    ))
                }
                Some(_) => {}
            }
        }
        for (name, creds) in &self.credentials {
            if creds.user.is_empty() {
                return Err(format!(
                    "directory.credentials.{name}.user must not be empty"
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for DirectoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectoryConfig")
            .field("url", &UpstreamTarget::from_url(&self.url).ok())
            .field("query", &self.query)
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_staleness", &self.max_staleness)
            .field("lookup_timeout", &self.lookup_timeout)
            .field("channel", &self.channel)
            .field("template", &self.template)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl fmt::Debug for DirectoryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectoryCredentials")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}
