//! Client handshake up to the password: TLS negotiation (SSLRequest, PG17 direct TLS,
//! GSSENCRequest refused) through pgwire, then StartupMessage or CancelRequest, protocol
//! version negotiation, and the cleartext password request that carries the JWT.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use pgwire::messages::PgWireFrontendMessage;
use pgwire::tokio::server::MaybeTls;
use tokio::net::TcpStream;

use crate::cancel::ClientKey;
use crate::config::{Config, ListenConfig, TlsMode};
use crate::error::ClientError;
use crate::protocol::frame::{read_frame, take_cstr, FrameError};
use crate::protocol::{messages, tags};

use super::client::ClientConn;

/// What the client asked for in its StartupMessage, filtered.
#[derive(Debug, Clone)]
pub struct StartupParams {
    pub user: String,
    pub database: String,
    /// Allow-listed parameters to apply on the server connection, in the client's spelling.
    pub forwarded: Vec<(String, String)>,
    pub application_name: Option<String>,
}

pub enum Hello {
    /// A CancelRequest on its own connection.
    Cancel(ClientKey),
    /// A session that sent its password (the JWT, not yet verified).
    Session {
        conn: Box<ClientConn>,
        params: StartupParams,
        token: String,
    },
    /// The client went away or is not speaking the protocol; nothing to answer.
    Gone,
}

/// A handshake failure, with the connection when an error can still be sent on it.
pub struct Refused {
    pub conn: Option<ClientConn>,
    pub error: ClientError,
}

impl Refused {
    fn on(conn: ClientConn, error: impl Into<ClientError>) -> Refused {
        Refused {
            conn: Some(conn),
            error: error.into(),
        }
    }
}

pub async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    config: &Config,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<Hello, Refused> {
    let offered_tls = tls.is_some();
    let framed = match pgwire::tokio::server::negotiate_tls::<()>(tcp, tls).await {
        Ok(Some(f)) => f,
        // Direct TLS without a certificate configured, or a broken connection.
        Ok(None) | Err(_) => return Ok(Hello::Gone),
    };
    let mut framed = framed;
    let is_tls = matches!(framed.get_ref(), MaybeTls::Tls(_));
    // CVE-2021-23214 class: bytes sent in plaintext before the TLS handshake must not be
    // read as if they came over TLS.
    if is_tls && !framed.read_buffer().is_empty() {
        return Err(Refused {
            conn: None,
            error: ClientError::Protocol("unencrypted data after SSL request".into()),
        });
    }
    let first = framed.next().await;
    let parts = framed.into_parts();
    let mut conn = ClientConn {
        io: parts.io,
        read_buf: parts.read_buf,
        peer,
        tls: is_tls,
        max_frame: config.limits.max_client_frame_bytes,
    };
    let startup = match first {
        Some(Ok(PgWireFrontendMessage::Startup(s))) => s,
        Some(Ok(PgWireFrontendMessage::CancelRequest(c))) => {
            // The key arrives as 4 bytes or (protocol 3.2 clients) longer; ours are 4.
            return Ok(match c.secret_key.as_i32() {
                Some(secret) => Hello::Cancel(ClientKey { pid: c.pid, secret }),
                None => Hello::Gone,
            });
        }
        Some(Ok(PgWireFrontendMessage::SslNegotiation(_))) if offered_tls || is_tls => {
            return Err(Refused::on(
                conn,
                ClientError::Protocol("unexpected SSL negotiation".into()),
            ));
        }
        Some(Ok(_)) | Some(Err(_)) => {
            return Err(Refused::on(
                conn,
                ClientError::Protocol("invalid startup packet".into()),
            ));
        }
        None => return Ok(Hello::Gone),
    };

    if startup.protocol_number_major != 3 {
        return Err(Refused::on(
            conn,
            ClientError::Unsupported("unsupported frontend protocol".into()),
        ));
    }
    let mut unknown_options: Vec<&str> = Vec::new();
    let mut params = StartupParams {
        user: String::new(),
        database: String::new(),
        forwarded: Vec::new(),
        application_name: None,
    };
    for (key, value) in &startup.parameters {
        match key.as_str() {
            "user" => params.user = value.clone(),
            "database" => params.database = value.clone(),
            "replication" if value != "false" && value != "off" && value != "0" => {
                return Err(Refused::on(
                    conn,
                    ClientError::Unsupported(
                        "replication connections are not supported through pgtenant".into(),
                    ),
                ));
            }
            k if k.starts_with("_pq_.") => unknown_options.push(k),
            k => {
                // `options` and anything not allow-listed never reach the server: PostgreSQL
                // applies startup parameters as settings (design/protocol.md trap 10).
                if let Some(canonical) = config
                    .listen
                    .forward_params
                    .iter()
                    .find(|p| p.eq_ignore_ascii_case(k))
                {
                    if canonical.eq_ignore_ascii_case("application_name") {
                        params.application_name = Some(value.clone());
                    }
                    params.forwarded.push((canonical.clone(), value.clone()));
                }
            }
        }
    }
    if params.user.is_empty() {
        return Err(Refused::on(
            conn,
            ClientError::Protocol("no PostgreSQL user name specified in startup packet".into()),
        ));
    }
    if params.database.is_empty() {
        params.database = params.user.clone();
    }

    let mut out = BytesMut::with_capacity(64);
    if startup.protocol_number_minor > 0 || !unknown_options.is_empty() {
        messages::negotiate_protocol_version(&mut out, 0, &unknown_options);
    }
    if let Err(e) = check_transport(conn.tls, peer.ip(), &config.listen) {
        return Err(Refused::on(conn, e));
    }
    messages::auth_cleartext_request(&mut out);
    if let Err(e) = conn.write_flush(&out).await {
        return Err(Refused {
            conn: None,
            error: e.into(),
        });
    }

    let token = match read_password(&mut conn, config.limits.max_password_bytes).await {
        Ok(t) => t,
        Err(e) => return Err(Refused::on(conn, e)),
    };
    Ok(Hello::Session {
        conn: Box::new(conn),
        params,
        token,
    })
}

/// Whether the client may send its token over this transport: TLS, or plaintext only from
/// loopback (development) unless the config explicitly allows it.
fn check_transport(tls: bool, peer: IpAddr, listen: &ListenConfig) -> Result<(), ClientError> {
    if tls {
        return Ok(());
    }
    if listen.tls == TlsMode::Require {
        return Err(ClientError::TlsRequired);
    }
    if !peer.is_loopback() && !listen.allow_cleartext_password_without_tls {
        return Err(ClientError::CleartextRefused);
    }
    Ok(())
}

/// Reads the PasswordMessage ourselves: pgwire caps it at 10,000 bytes and real IdP tokens
/// can be larger (design/protocol.md trap 3).
async fn read_password(conn: &mut ClientConn, max: u32) -> Result<String, ClientError> {
    let (tag, body_len) = read_frame(&mut conn.io, &mut conn.read_buf, max).await?;
    if tag != tags::PASSWORD_MESSAGE {
        return Err(FrameError::UnexpectedTag {
            expected: tags::PASSWORD_MESSAGE,
            got: tag,
        }
        .into());
    }
    let frame = conn.read_buf.split_to(5 + body_len);
    let mut body = &frame[5..];
    let raw = take_cstr(&mut body)
        .ok_or_else(|| ClientError::Protocol("invalid password packet".into()))?;
    let token = std::str::from_utf8(raw)
        .map_err(|_| ClientError::Protocol("password is not valid UTF-8".into()))?
        .trim()
        .to_string();
    body.advance(body.len());
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(tls: TlsMode, allow: bool) -> ListenConfig {
        let mut cfg = crate::config::Config::parse(
            "[listen]\n[jwt]\nsecret = \"0123456789abcdef0123456789abcdef\"\n[upstreams.s]\nkind = \"dedicated\"\nurl = \"postgres://u@h/d\"\n",
        )
        .unwrap()
        .listen;
        cfg.tls = tls;
        cfg.allow_cleartext_password_without_tls = allow;
        cfg
    }

    #[test]
    fn cleartext_token_needs_tls_or_loopback() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let v6_local: IpAddr = "::1".parse().unwrap();
        assert!(check_transport(true, remote, &listen(TlsMode::Allow, false)).is_ok());
        assert!(check_transport(false, local, &listen(TlsMode::Allow, false)).is_ok());
        assert!(check_transport(false, v6_local, &listen(TlsMode::Allow, false)).is_ok());
        assert!(matches!(
            check_transport(false, remote, &listen(TlsMode::Allow, false)),
            Err(ClientError::CleartextRefused)
        ));
        assert!(check_transport(false, remote, &listen(TlsMode::Allow, true)).is_ok());
        assert!(matches!(
            check_transport(false, local, &listen(TlsMode::Require, true)),
            Err(ClientError::TlsRequired)
        ));
    }
}
