//! Configuration: serde structs for the TOML file, `${VAR}` expansion, and `validate()`.
//!
//! Loading is parse → expand env → validate; an invalid file never replaces a running config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("environment variable {0} referenced in config is not set")]
    MissingEnv(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    pub jwt: JwtConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub tenants: TenantsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub doctor: DoctorConfig,
    /// The audit trail; absent means no audit.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditConfig>,
    /// The live tenant directory; absent means only `[tenants]` routes.
    #[serde(default)]
    pub directory: Option<crate::tenant::DirectoryConfig>,
    /// Several replicas behind one TCP load balancer: cancel keys carry the replica id and
    /// a CancelRequest for another replica is forwarded there. Absent: replica 0, no peers.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The admin console (virtual database). Reloadable.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Bounds of the named prepared statement caches (transaction pooling).
    #[serde(default)]
    pub prepared_statements: crate::prepared::PreparedConfig,
}

/// `pgtenant serve` runs the doctor's isolation checks on every shared upstream at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoctorConfig {
    /// `refuse` (default): fatal findings stop the start; `warn`: log them; `off`: skip.
    #[serde(default)]
    pub on_start: DoctorOnStart,
    /// Tenant column name in tenant tables. Default `tenant_id`.
    pub tenant_column: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DoctorOnStart {
    #[default]
    Refuse,
    Warn,
    Off,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads. Default: one per core. On a host shared with PostgreSQL, fewer
    /// workers than cores can cost less CPU per statement. Not reloadable.
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: SSLRequest is answered 'N'.
    Disable,
    /// TLS offered when a certificate is configured; plaintext accepted.
    #[default]
    Allow,
    /// Plaintext clients are refused (28000) before they send a password.
    Require,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Client listener. Default 127.0.0.1:6432.
    #[serde(default = "ListenConfig::default_addr")]
    pub addr: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls: TlsMode,
    /// Accept a cleartext JWT from a non-loopback client without TLS. Default false.
    #[serde(default)]
    pub allow_cleartext_password_without_tls: bool,
    /// Startup parameters a client may set; everything else (and always `options`) is dropped.
    #[serde(default = "ListenConfig::default_forward_params")]
    pub forward_params: Vec<String>,
}

impl ListenConfig {
    fn default_addr() -> SocketAddr {
        "127.0.0.1:6432".parse().expect("valid literal address")
    }
    pub fn default_forward_params() -> Vec<String> {
        [
            "application_name",
            "client_encoding",
            "DateStyle",
            "TimeZone",
            "IntervalStyle",
            "extra_float_digits",
            "lc_monetary",
            "lc_numeric",
            "lc_time",
            "bytea_output",
            "statement_timeout",
            "lock_timeout",
            "idle_in_transaction_session_timeout",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// HTTP listener for /metrics, /healthz, /readyz.
    pub addr: SocketAddr,
}

/// Label cardinality of the Prometheus series (set once at start; not reloadable).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-tenant `tenant` labels. `false`: every series says `tenant="other"`. Default true.
    #[serde(default = "MetricsConfig::default_tenant_labels")]
    pub tenant_labels: bool,
    /// Distinct tenant label values at most; later tenants share `other`. Default 1000.
    #[serde(default = "MetricsConfig::default_max_tenant_labels")]
    pub max_tenant_labels: usize,
}

impl MetricsConfig {
    fn default_tenant_labels() -> bool {
        true
    }
    fn default_max_tenant_labels() -> usize {
        1000
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            tenant_labels: Self::default_tenant_labels(),
            max_tenant_labels: Self::default_max_tenant_labels(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Allowed algorithms, e.g. ["HS256"] or ["RS256", "ES256"]. Never taken from the token alone.
    #[serde(default = "JwtConfig::default_algorithms")]
    pub algorithms: Vec<String>,
    /// HMAC secret (use `${ENV_VAR}`); at least 32 bytes.
    pub secret: Option<String>,
    /// File holding the HMAC secret (trailing newline stripped).
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC or Ed25519) for RS*/PS*/ES*/EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// JWKS JSON file; the token's `kid` selects the key.
    pub jwks_file: Option<PathBuf>,
    /// Required and matched when set.
    pub issuer: Option<String>,
    /// Required and matched when set.
    pub audience: Option<String>,
    /// Claim holding the tenant id; dots address nested claims ("app.tenant").
    #[serde(default = "JwtConfig::default_tenant_claim")]
    pub tenant_claim: String,
    /// Claim holding the user; dots address nested claims. Default "sub".
    #[serde(default = "JwtConfig::default_user_claim")]
    pub user_claim: String,
    /// Clock skew tolerated for exp/nbf/iat, seconds. Default 30.
    #[serde(default = "JwtConfig::default_leeway")]
    pub leeway_secs: u64,
    /// Tenant ids must match this pattern (anchored). Default `^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`.
    #[serde(default = "JwtConfig::default_tenant_pattern")]
    pub tenant_pattern: String,
    /// JWKS fetched from this URL (https; http only to a loopback host or with
    /// `jwks_allow_http`), refreshed in the background. The first fetch must succeed for
    /// `serve` to start.
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again. Default 5m.
    #[serde(with = "humantime_serde", default = "JwtConfig::default_jwks_refresh")]
    pub jwks_refresh_interval: Duration,
    /// After this long without a successful fetch, tokens are refused (57P03) instead of
    /// being checked against old keys. Default 1h.
    #[serde(
        with = "humantime_serde",
        default = "JwtConfig::default_jwks_staleness"
    )]
    pub jwks_max_staleness: Duration,
    /// Deadline for one fetch (connect, TLS, response). Default 2s.
    #[serde(with = "humantime_serde", default = "JwtConfig::default_jwks_timeout")]
    pub jwks_fetch_timeout: Duration,
    /// A token with an unknown `kid` triggers a fetch at most this often (so bad tokens
    /// cannot make pgtenant hammer the issuer); also the retry delay after a failed fetch.
    /// Default 30s.
    #[serde(with = "humantime_serde", default = "JwtConfig::default_jwks_miss")]
    pub jwks_min_refetch_interval: Duration,
    /// Allow `http://` to a non-loopback host. Default false: a JWKS decides whose tokens
    /// are genuine, so it must not travel unauthenticated.
    #[serde(default)]
    pub jwks_allow_http: bool,
    /// CA bundle (PEM) that replaces the built-in web roots for the JWKS server.
    pub jwks_ca_file: Option<PathBuf>,
    /// `"token"`: a session ends when its token expires (at its next idle point outside a
    /// transaction); a duration such as `"1h"`: sessions end that long after they start.
    /// Absent: sessions outlive their token. Reloadable (for new sessions).
    #[serde(default)]
    pub session_max_lifetime: Option<SessionLifetime>,
}

/// `[jwt] session_max_lifetime`: how long an authenticated session may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLifetime {
    /// Until the token's `exp` (plus `leeway_secs`, as the verifier accepts it).
    Token,
    /// This long after the session started.
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for SessionLifetime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.eq_ignore_ascii_case("token") {
            return Ok(SessionLifetime::Token);
        }
        match humantime_serde::re::humantime::parse_duration(&text) {
            Ok(d) if !d.is_zero() => Ok(SessionLifetime::Fixed(d)),
            _ => Err(serde::de::Error::custom(format!(
                "session_max_lifetime must be \"token\" or a duration such as \"1h\", not {text:?}"
            ))),
        }
    }
}

/// `[console]`: the admin console, reached by connecting to the virtual database `database`
/// with a token whose `admin_claim` grants it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Default true. False: the console database name is routed like any other.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The virtual database name. Default `pgtenant`.
    #[serde(default = "ConsoleConfig::default_database")]
    pub database: String,
    /// The claim that makes a token an admin token (dots address nested claims). Default
    /// `pgtenant_admin`.
    #[serde(default = "ConsoleConfig::default_admin_claim")]
    pub admin_claim: String,
    /// Unset: the claim must be JSON `true`. Set: the claim must equal this string, hold it
    /// as one of its space-separated words, or be an array containing it.
    pub admin_value: Option<String>,
}

impl ConsoleConfig {
    fn default_database() -> String {
        "pgtenant".into()
    }
    fn default_admin_claim() -> String {
        "pgtenant_admin".into()
    }
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            database: Self::default_database(),
            admin_claim: Self::default_admin_claim(),
            admin_value: None,
        }
    }
}

impl JwtConfig {
    fn default_algorithms() -> Vec<String> {
        vec!["HS256".into()]
    }
    fn default_tenant_claim() -> String {
        "tenant_id".into()
    }
    fn default_user_claim() -> String {
        "sub".into()
    }
    fn default_leeway() -> u64 {
        30
    }
    pub fn default_tenant_pattern() -> String {
        "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$".into()
    }
    pub fn default_jwks_refresh() -> Duration {
        Duration::from_secs(300)
    }
    pub fn default_jwks_staleness() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn default_jwks_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn default_jwks_miss() -> Duration {
        Duration::from_secs(30)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// One database per tenant: no tenant context is applied.
    Dedicated,
    /// Several tenants share the database; RLS keys on `tenant_setting`.
    Shared,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerTlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// postgres://user:password@host:port/dbname
    pub url: String,
    /// Session setting that carries the tenant on shared upstreams.
    #[serde(default = "UpstreamConfig::default_tenant_setting")]
    pub tenant_setting: String,
    /// Server connections in this pool. Default 20.
    #[serde(default = "UpstreamConfig::default_pool_size")]
    pub pool_size: u32,
    /// Wait this long for a free server connection, then 53300. Default 5s.
    #[serde(
        with = "humantime_serde",
        default = "UpstreamConfig::default_checkout_timeout"
    )]
    pub checkout_timeout: Duration,
    /// TCP connect + startup + auth deadline for a new server connection. Default 5s.
    #[serde(
        with = "humantime_serde",
        default = "UpstreamConfig::default_connect_timeout"
    )]
    pub connect_timeout: Duration,
    /// Idle server connections are closed after this long. Default 10m.
    #[serde(
        with = "humantime_serde",
        default = "UpstreamConfig::default_idle_timeout"
    )]
    pub idle_timeout: Duration,
    /// TLS to the server. Default disable.
    #[serde(default)]
    pub tls: ServerTlsMode,
    /// CA bundle to verify the server certificate; without it the certificate is not verified.
    pub tls_ca_file: Option<PathBuf>,
    /// How the tenant reaches the database on a shared upstream. Default `setting`.
    #[serde(default)]
    pub context: ContextMode,
    /// Keys and schema of the signed context (`context = "signed"`).
    pub signed_context: Option<crate::isolation::signed::SignedContextConfig>,
    /// Inspect every Query and Parse with the SQL guard (shared upstreams). Default true.
    #[serde(default = "yes")]
    pub guard: bool,
    /// Which statement classes the guard blocks (`tenant_setting` is taken from above).
    #[serde(default)]
    pub guard_rules: crate::isolation::guard::GuardConfig,
    /// Let FunctionCall ('F') messages through on a shared upstream. Default false (0A000).
    #[serde(default)]
    pub allow_function_call: bool,
    /// With `[audit] sink = "tenant"`: this dedicated upstream's events go to this database
    /// (an insert-only role), not to the central audit database.
    pub audit_url: Option<String>,
    /// `session` (default): one server connection per client session. `transaction`: a
    /// server connection per transaction, returned at ReadyForQuery idle (README
    /// "Transaction pooling"). Not reloadable for an existing pool (a change builds a new one).
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Transaction mode: the most server connections one tenant may hold at once. Default
    /// (unset) = `pool_size`, i.e. no per-tenant cap. Must be 1..=pool_size.
    pub max_server_connections_per_tenant: Option<u32>,
    /// Transaction mode: what a session-only feature (session SET of other parameters,
    /// LISTEN, session advisory locks, WITH HOLD cursors, SQL PREPARE, temp tables) does.
    /// Default `pin`.
    #[serde(default)]
    pub session_features: SessionFeatures,
}

/// How server connections are shared between client sessions.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps one server connection for its whole session.
    #[default]
    Session,
    /// A client holds a server connection only during a transaction.
    Transaction,
}

/// Transaction mode: the answer to a statement that needs session state on the server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionFeatures {
    /// The client keeps its current server connection until it ends (metric with a reason).
    #[default]
    Pin,
    /// The statement is refused with 0A000 naming the feature; the session goes on.
    Refuse,
}

impl UpstreamConfig {
    /// The per-tenant cap of a transaction-mode pool (`pool_size` when unset).
    pub fn tenant_cap(&self) -> u32 {
        self.max_server_connections_per_tenant
            .unwrap_or(self.pool_size)
            .min(self.pool_size)
    }
}

fn yes() -> bool {
    true
}

/// The tenant context on a shared upstream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// `set_config(tenant_setting, tenant)`: policies read `current_setting(...)`. A client
    /// with SQL access can change it; not a security boundary on its own.
    #[default]
    Setting,
    /// The signed context (`pgtenant rls install`): policies read `<schema>.current_tenant()`,
    /// which only a proof signed by the proxy can set. The setting is applied too, for reading.
    Signed,
}

impl UpstreamConfig {
    fn default_tenant_setting() -> String {
        "app.current_tenant_id".into()
    }
    fn default_pool_size() -> u32 {
        20
    }
    fn default_checkout_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
}

/// `[tenants]`: `default = "upstream"` plus `tenant = "upstream"` entries.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TenantsConfig {
    pub default: Option<String>,
    #[serde(flatten)]
    pub map: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Deadline for TLS + startup + password. Default 10s.
    #[serde(
        with = "humantime_serde",
        default = "LimitsConfig::default_auth_timeout"
    )]
    pub auth_timeout: Duration,
    /// Largest frame accepted from a client after authentication. Default 64 MiB.
    #[serde(default = "LimitsConfig::default_max_frame")]
    pub max_client_frame_bytes: u32,
    /// Largest password (JWT) message. Default 64 KiB.
    #[serde(default = "LimitsConfig::default_max_password")]
    pub max_password_bytes: u32,
    /// Connections still authenticating, at most. Default 1024.
    #[serde(default = "LimitsConfig::default_max_pre_auth")]
    pub max_pre_auth_connections: usize,
    /// Client connections at most. Default 10000.
    #[serde(default = "LimitsConfig::default_max_clients")]
    pub max_client_connections: usize,
    /// On SIGTERM/SIGINT, wait this long for sessions to finish their transaction. Default 30s.
    #[serde(
        with = "humantime_serde",
        default = "LimitsConfig::default_shutdown_timeout"
    )]
    pub shutdown_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            auth_timeout: Self::default_auth_timeout(),
            max_client_frame_bytes: Self::default_max_frame(),
            max_password_bytes: Self::default_max_password(),
            max_pre_auth_connections: Self::default_max_pre_auth(),
            max_client_connections: Self::default_max_clients(),
            shutdown_timeout: Self::default_shutdown_timeout(),
        }
    }
}

impl LimitsConfig {
    fn default_auth_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_max_frame() -> u32 {
        64 << 20
    }
    fn default_max_password() -> u32 {
        64 << 10
    }
    fn default_max_pre_auth() -> usize {
        1024
    }
    fn default_max_clients() -> usize {
        10_000
    }
    fn default_shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(&text)?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text after `${VAR}` expansion. Does not validate.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let expanded = expand_env(text)?;
        toml::from_str(&expanded).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Relative file paths are taken relative to the current directory first, then to the config file.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p {
                if path.is_relative() && !path.exists() && base.join(&*path).exists() {
                    *path = base.join(&*path);
                }
            }
        };
        fix(&mut self.listen.tls_cert);
        fix(&mut self.listen.tls_key);
        fix(&mut self.jwt.secret_file);
        fix(&mut self.jwt.public_key_file);
        fix(&mut self.jwt.jwks_file);
        fix(&mut self.jwt.jwks_ca_file);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.tls_cert.is_some() != self.listen.tls_key.is_some() {
            return invalid("listen.tls_cert and listen.tls_key must be set together".into());
        }
        if self.listen.tls == TlsMode::Require && self.listen.tls_cert.is_none() {
            return invalid("listen.tls = \"require\" needs tls_cert and tls_key".into());
        }
        if self.upstreams.is_empty() {
            return invalid("at least one [upstreams.NAME] is required".into());
        }
        for (name, up) in &self.upstreams {
            crate::pool::UpstreamTarget::from_url(&up.url)
                .map_err(|e| ConfigError::Invalid(format!("upstreams.{name}.url: {e}")))?;
            if up.pool_size == 0 {
                return invalid(format!("upstreams.{name}.pool_size must be at least 1"));
            }
            validate_pool_mode(name, up).map_err(ConfigError::Invalid)?;
            if up.context == ContextMode::Signed
                && (up.kind != UpstreamKind::Shared || up.signed_context.is_none())
            {
                return invalid(format!(
                    "upstreams.{name}: context = \"signed\" needs kind = \"shared\" and a [upstreams.{name}.signed_context] table"
                ));
            }
            if up.kind == UpstreamKind::Shared && !valid_setting_name(&up.tenant_setting) {
                return invalid(format!(
                    "upstreams.{name}.tenant_setting must look like \"prefix.name\" (a custom placeholder setting)"
                ));
            }
        }
        if let Some(d) = &self.tenants.default {
            if !self.upstreams.contains_key(d) {
                return invalid(format!("tenants.default names unknown upstream {d:?}"));
            }
        }
        for (tenant, up) in &self.tenants.map {
            if !self.upstreams.contains_key(up) {
                return invalid(format!("tenants.{tenant} names unknown upstream {up:?}"));
            }
        }
        let sources = [
            self.jwt.secret.is_some(),
            self.jwt.secret_file.is_some(),
            self.jwt.public_key_file.is_some(),
            self.jwt.jwks_file.is_some(),
            self.jwt.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return invalid(
                "[jwt] needs exactly one of secret, secret_file, public_key_file, jwks_file, jwks_url".into(),
            );
        }
        if let Err(e) = regex::Regex::new(&self.jwt.tenant_pattern) {
            return invalid(format!("jwt.tenant_pattern: {e}"));
        }
        if let Some(audit) = &self.audit {
            audit.validate().map_err(ConfigError::Invalid)?;
            for (name, up) in &self.upstreams {
                if let Some(url) = &up.audit_url {
                    crate::pool::UpstreamTarget::from_url(url).map_err(|e| {
                        ConfigError::Invalid(format!("upstreams.{name}.audit_url: {e}"))
                    })?;
                    if up.kind != UpstreamKind::Dedicated {
                        return invalid(format!(
                            "upstreams.{name}.audit_url is only for dedicated upstreams"
                        ));
                    }
                }
            }
        }
        if let Some(directory) = &self.directory {
            directory
                .validate(&self.upstreams)
                .map_err(ConfigError::Invalid)?;
        }
        if self.jwt.leeway_secs > 300 {
            return invalid("jwt.leeway_secs above 300 is refused".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(ConfigError::Invalid)?;
        }
        if self.console.enabled
            && (self.console.database.is_empty() || self.console.admin_claim.is_empty())
        {
            return invalid("console.database and console.admin_claim must not be empty".into());
        }
        Ok(())
    }
}

/// A custom setting name such as `app.current_tenant_id`: two or more dotted identifiers.
fn valid_setting_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        })
}

/// Replaces `${VAR}` with the environment variable's value; `$${` escapes a literal `${`.
pub fn expand_env(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::Parse("unterminated ${ in config".into()))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| ConfigError::MissingEnv(name.into()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Transaction-mode settings of one upstream.
fn validate_pool_mode(name: &str, up: &UpstreamConfig) -> Result<(), String> {
    if let Some(cap) = up.max_server_connections_per_tenant {
        if cap == 0 || cap > up.pool_size {
            return Err(format!(
                "upstreams.{name}.max_server_connections_per_tenant must be between 1 and pool_size ({})",
                up.pool_size
            ));
        }
    }
    if up.pool_mode == PoolMode::Transaction && up.context == ContextMode::Signed {
        // The signed context is entered with a round trip per server connection and bound to
        // one backend; per-transaction attach would need it per transaction. Refused rather
        // than half-supported.
        return Err(format!(
            "upstreams.{name}: pool_mode = \"transaction\" cannot be combined with context = \"signed\" (use session pooling for signed contexts)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[listen]
addr = "127.0.0.1:6432"
tls = "allow"

[admin]
addr = "127.0.0.1:9930"

[jwt]
algorithms = ["HS256"]
secret = "0123456789abcdef0123456789abcdef"
issuer = "https://auth.example.com"
audience = "pgtenant"

[upstreams.shared]
kind = "shared"
url = "postgres://pgtenant:secret@127.0.0.1:5432/saas"
tenant_setting = "app.current_tenant_id"
pool_size = 20

[upstreams.acme]
kind = "dedicated"
url = "postgres://acme_app:secret@127.0.0.1:5432/acme_db"
pool_size = 5
checkout_timeout = "2s"

[tenants]
default = "shared"
acme = "acme"
"#;

    #[test]
    fn issue_sample_parses_and_validates() {
        let cfg = Config::parse(SAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.tenants.default.as_deref(), Some("shared"));
        assert_eq!(
            cfg.tenants.map.get("acme").map(String::as_str),
            Some("acme")
        );
        assert_eq!(
            cfg.upstreams["acme"].checkout_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(cfg.jwt.leeway_secs, 30);
    }

    #[test]
    fn the_shipped_example_parses_and_validates() {
        for var in [
            "PGTENANT_SHARED_PASSWORD",
            "PGTENANT_ACME_PASSWORD",
            "PGTENANT_AUDIT_PASSWORD",
        ] {
            std::env::set_var(var, "example-pw");
        }
        let text = include_str!("../config/pgtenant.example.toml");
        let cfg = Config::parse(text).unwrap();
        cfg.validate().unwrap();
        let audit = cfg.audit.unwrap();
        assert_eq!(audit.table, "audit_tenant_access");
        assert_eq!(audit.on_full, crate::audit::OnFull::FailClosed);
    }

    #[test]
    fn unknown_upstream_in_tenant_map_is_rejected() {
        let bad = SAMPLE.replace("acme = \"acme\"", "acme = \"nope\"");
        let err = Config::parse(&bad).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("unknown upstream"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bad = SAMPLE.replace("pool_size = 5", "pool_sise = 5");
        assert!(Config::parse(&bad).is_err());
    }

    #[test]
    fn env_expansion() {
        std::env::set_var("PGTENANT_TEST_SECRET_X", "abc");
        assert_eq!(
            expand_env("a ${PGTENANT_TEST_SECRET_X} b").unwrap(),
            "a abc b"
        );
        assert_eq!(expand_env("lit $${X}").unwrap(), "lit ${X}");
        assert!(matches!(
            expand_env("${PGTENANT_SURELY_UNSET_VAR}"),
            Err(ConfigError::MissingEnv(_))
        ));
    }

    #[test]
    fn setting_names() {
        assert!(valid_setting_name("app.current_tenant_id"));
        assert!(!valid_setting_name("search_path"));
        assert!(!valid_setting_name("app.x'; drop"));
    }

    #[test]
    fn transaction_pooling_settings_are_validated() {
        let mut cfg = Config::parse(SAMPLE).unwrap();
        let shared = cfg.upstreams.get_mut("shared").unwrap();
        assert_eq!(shared.pool_mode, PoolMode::Session);
        assert_eq!(shared.session_features, SessionFeatures::Pin);
        assert_eq!(shared.tenant_cap(), shared.pool_size, "no cap by default");
        shared.pool_mode = PoolMode::Transaction;
        shared.max_server_connections_per_tenant = Some(shared.pool_size + 1);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("max_server_connections_per_tenant"), "{err}");
        let shared = cfg.upstreams.get_mut("shared").unwrap();
        shared.max_server_connections_per_tenant = Some(1);
        cfg.validate().unwrap();
        let shared = cfg.upstreams.get_mut("shared").unwrap();
        shared.context = ContextMode::Signed;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("cannot be combined"), "{err}");
        let parsed: UpstreamConfig = toml::from_str(
            "kind = \"shared\"\nurl = \"postgres://u:p@h/db\"\npool_mode = \"transaction\"\nsession_features = \"refuse\"",
        )
        .unwrap();
        assert_eq!(parsed.session_features, SessionFeatures::Refuse);
    }
}
