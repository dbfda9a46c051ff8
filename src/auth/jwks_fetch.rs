//! One HTTP(S) GET of a JWKS document, with hyper's HTTP/1 client over tokio-rustls: no
//! redirects, no cookies, no proxies, a size cap, and the web PKI roots (or the configured
//! CA bundle) for HTTPS. The caller bounds it with its own timeout.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Host, Url};

/// Why a fetch failed. Goes to the operator's log only, never to clients.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP status {0} (redirects are not followed)")]
    Status(u16),
    #[error("response is larger than {0} bytes")]
    TooLarge(usize),
    #[error("response body: {0}")]
    Body(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Invalid(String),
}

/// Where the JWKS lives and how to reach it, checked once at config load.
pub(crate) struct JwksEndpoint {
    host: Host,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Request target: path and query.
    target: String,
    /// `Some` for https.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// scheme://host:port/path, without the query (which may carry a credential), for logs.
    shown: String,
}

impl std::fmt::Debug for JwksEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Aborts the spawned connection task when the fetch ends or is cancelled (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl JwksEndpoint {
    /// Parses and checks `url`: https, or http to a loopback host (or anywhere with
    /// `allow_http`); no user info. Errors name the problem, not the URL's query.
    pub(crate) fn new(url: &str, allow_http: bool, ca_file: Option<&Path>) -> Result<Self, String> {
        let url = Url::parse(url).map_err(|e| format!("jwt.jwks_url is not a URL: {e}"))?;
        let host = url.host().ok_or("jwt.jwks_url has no host")?.to_owned();
        if !url.username().is_empty() || url.password().is_some() {
            return Err("jwt.jwks_url must not carry a user name or password".into());
        }
        let loopback = match &host {
            Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
            Host::Ipv4(ip) => ip.is_loopback(),
            Host::Ipv6(ip) => ip.is_loopback(),
        };
        let https = match url.scheme() {
            "https" => true,
            "http" if loopback || allow_http => false,
            "http" => {
                return Err("jwt.jwks_url uses http to a non-loopback host: use https (or set jwt.jwks_allow_http = true)".into())
            }
            other => return Err(format!("jwt.jwks_url: unsupported scheme {other:?}")),
        };
        let port = url
            .port_or_known_default()
            .ok_or("jwt.jwks_url has no port")?;
        let host_text = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host_text}:{p}"),
            None => host_text.to_owned(),
        };
        let mut target = url.path().to_owned();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let tls = if https {
            let name = match &host {
                Host::Domain(d) => ServerName::try_from(d.clone()),
                Host::Ipv4(ip) => Ok(ServerName::from(IpAddr::V4(*ip))),
                Host::Ipv6(ip) => Ok(ServerName::from(IpAddr::V6(*ip))),
            }
            .map_err(|e| format!("jwt.jwks_url host: {e}"))?;
            Some((tls_connector(ca_file)?, name))
        } else {
            None
        };
        Ok(JwksEndpoint {
            host,
            port,
            authority,
            target,
            tls,
            shown: format!("{}://{host_text}:{port}{}", url.scheme(), url.path()),
        })
    }

    /// The URL without its query, for logs.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// GETs the document; any status but 200 is an error. Reads at most `max` bytes.
    /// Not bounded in time: the caller wraps it in a timeout (cancel-safe: dropping it
    /// closes the connection).
    pub(crate) async fn get(&self, max: usize) -> Result<Bytes, FetchError> {
        let tcp = match &self.host {
            Host::Domain(d) => TcpStream::connect((d.as_str(), self.port)).await,
            Host::Ipv4(ip) => TcpStream::connect(SocketAddr::from((*ip, self.port))).await,
            Host::Ipv6(ip) => TcpStream::connect(SocketAddr::from((*ip, self.port))).await,
        }
        .map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(FetchError::Tls)?,
            ),
            None => Box::new(tcp),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let request = hyper::Request::get(&self.target)
            .header(hyper::header::HOST, &self.authority)
            .header(
                hyper::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("pgtenant/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Invalid(format!("request: {e}")))?;
        let response = sender.send_request(request).await?;
        if response.status() != hyper::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(FetchError::TooLarge(max));
        }
        match Limited::new(response.into_body(), max).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(FetchError::TooLarge(max))
            }
            Err(e) => Err(FetchError::Body(e.to_string())),
        }
    }
}

/// rustls with aws-lc-rs, verifying the server against the web PKI roots or `ca_file`.
fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("jwt.jwks_ca_file {shown}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("jwt.jwks_ca_file {shown}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("jwt.jwks_ca_file {shown}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("jwt.jwks_ca_file {shown}: no certificates found"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let ok = JwksEndpoint::new(
            "https://idp.example.com/.well-known/jwks.json?x=secret",
            false,
            None,
        )
        .unwrap();
        assert_eq!(
            ok.shown(),
            "https://idp.example.com:443/.well-known/jwks.json"
        );
        assert_eq!(ok.target, "/.well-known/jwks.json?x=secret");
        assert!(ok.tls.is_some());
        let local = JwksEndpoint::new("http://127.0.0.1:8080/jwks", false, None).unwrap();
        assert!(local.tls.is_none());
        assert_eq!(local.authority, "127.0.0.1:8080");
        JwksEndpoint::new("http://[::1]:8080/jwks", false, None).unwrap();
        JwksEndpoint::new("http://localhost/jwks", false, None).unwrap();

        let refused = JwksEndpoint::new("http://idp.example.com/jwks", false, None).unwrap_err();
        assert!(refused.contains("jwks_allow_http"), "{refused}");
        JwksEndpoint::new("http://idp.example.com/jwks", true, None).unwrap();
        for bad in ["ftp://x/jwks", "https://u:p@x/jwks", "not a url"] {
            assert!(JwksEndpoint::new(bad, true, None).is_err(), "{bad}");
        }
    }
}
