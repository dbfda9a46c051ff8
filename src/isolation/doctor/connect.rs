//! Control-plane connections for the doctor: tokio-postgres as the pool role (from the
//! upstream URL) and, optionally, as an administrator, with TLS from the upstream's settings.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Socket};
use tokio_rustls::TlsConnector;

use super::DoctorError;
use crate::config::{ServerTlsMode, UpstreamConfig};
use crate::pool::{ServerTls, UpstreamTarget};

/// `application_name` of the doctor's sessions, so they are recognisable in `pg_stat_activity`.
const APPLICATION_NAME: &str = "pgtenant-doctor";

/// Session settings for every doctor connection: fully qualified names from `pg_get_expr`
/// (so policy text can be matched), read-only, and bounded statements.
const SESSION_SETUP: &str = "SET search_path = pg_catalog, pg_temp;
     SET default_transaction_read_only = on;
     SET statement_timeout = '30s';
     SET lock_timeout = '2s'";

/// Connects as the pool role of `upstream`, exactly as its URL and TLS settings say.
pub(super) async fn connect_pool(
    name: &str,
    upstream: &UpstreamConfig,
) -> Result<Client, DoctorError> {
    let target = UpstreamTarget::from_url(&upstream.url).map_err(|reason| DoctorError::Url {
        upstream: name.to_owned(),
        reason,
    })?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&target.host)
        .port(target.port)
        .user(&target.user)
        .dbname(&target.database)
        .application_name(APPLICATION_NAME)
        .connect_timeout(upstream.connect_timeout)
        .ssl_mode(match upstream.tls {
            ServerTlsMode::Disable => SslMode::Disable,
            ServerTlsMode::Prefer => SslMode::Prefer,
            ServerTlsMode::Require => SslMode::Require,
        });
    if let Some(pw) = &target.password {
        config.password(pw);
    }
    connect(name, config, upstream).await
}

/// Connects with `admin_url` (a URL or `key=value` string, as libpq accepts) to the
/// upstream's database: the database name in `admin_url` is replaced by the upstream's.
pub(super) async fn connect_admin(
    name: &str,
    upstream: &UpstreamConfig,
    admin_url: &str,
) -> Result<Client, DoctorError> {
    let target = UpstreamTarget::from_url(&upstream.url).map_err(|reason| DoctorError::Url {
        upstream: name.to_owned(),
        reason,
    })?;
    let mut config =
        tokio_postgres::Config::from_str(admin_url).map_err(|e| DoctorError::AdminUrl {
            upstream: name.to_owned(),
            // tokio-postgres does not echo the string (and so no password) in this error.
            reason: e.to_string(),
        })?;
    config
        .dbname(&target.database)
        .application_name(APPLICATION_NAME);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(upstream.connect_timeout);
    }
    connect(name, config, upstream).await
}

async fn connect(
    name: &str,
    config: tokio_postgres::Config,
    upstream: &UpstreamConfig,
) -> Result<Client, DoctorError> {
    let tls = MakeRustls(client_tls(name, upstream)?);
    let connecting = config.connect(tls);
    // connect_timeout bounds each TCP attempt; this bounds startup and authentication too.
    let deadline = upstream.connect_timeout.saturating_mul(2);
    let (client, connection) = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(source)) => {
            return Err(DoctorError::Connect {
                upstream: name.to_owned(),
                source,
            })
        }
        Err(_) => {
            return Err(DoctorError::ConnectTimeout {
                upstream: name.to_owned(),
            })
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "doctor connection closed");
        }
    });
    client
        .batch_execute(SESSION_SETUP)
        .await
        .map_err(|source| DoctorError::Query {
            upstream: name.to_owned(),
            step: "session setup",
            source,
        })?;
    Ok(client)
}

/// The rustls client config of the upstream (its CA file when set; otherwise encryption
/// without server authentication, as the pool does). Built even when the upstream's TLS is
/// disabled, for an admin URL that asks for `sslmode=prefer|require`.
fn client_tls(name: &str, upstream: &UpstreamConfig) -> Result<Arc<ClientConfig>, DoctorError> {
    let mut with_tls = upstream.clone();
    if with_tls.tls == ServerTlsMode::Disable {
        with_tls.tls = ServerTlsMode::Require;
    }
    let tls_error = |reason: String| DoctorError::Tls {
        upstream: name.to_owned(),
        reason,
    };
    let server_tls = ServerTls::from_config(&with_tls).map_err(|e| tls_error(e.to_string()))?;
    server_tls
        .client_config()
        .cloned()
        .ok_or_else(|| tls_error("no TLS client configuration".to_owned()))
}

/// tokio-postgres TLS over tokio-rustls. No channel binding (SCRAM falls back to plain SCRAM).
struct MakeRustls(Arc<ClientConfig>);

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream<Socket>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        // Empty for unix sockets, where the server answers the SSLRequest with 'N' anyway.
        let domain = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        let name = ServerName::try_from(domain.to_owned())?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}
