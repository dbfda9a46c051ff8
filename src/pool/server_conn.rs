//! One authenticated connection to a PostgreSQL server, spoken to with raw protocol
//! frames: connect (TCP, TLS, startup, authentication), the few round trips the pool makes
//! on its own (session settings, reset), and an idle liveness check.
//!
//! Everything else on the connection is the relay's business: it reads from `read_buf`
//! first, then from `stream`, and keeps `tx_status`, `params` and `broken` up to date.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{
    AUTHENTICATION_TAG, BACKEND_KEY_DATA_TAG, COPY_IN_RESPONSE_TAG, DATA_ROW_TAG,
    ERROR_RESPONSE_TAG, NOTICE_RESPONSE_TAG, NOTIFICATION_RESPONSE_TAG, PARAMETER_STATUS_TAG,
    READY_FOR_QUERY_TAG,
};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::target::UpstreamTarget;
use super::tls::{ServerStream, ServerTls};
use super::wire::{self, ErrorFields, MAX_CONTROL_FRAME};
use crate::config::ServerTlsMode;

/// Deadline for `reset` (ROLLBACK + DISCARD ALL).
pub const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// `application_name` of every server connection; clients' own names are not forwarded
/// at startup.
pub const APPLICATION_NAME: &str = "pgtenant";

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// `check_idle` stops reading after this much unsolicited data (and then fails).
const IDLE_READ_LIMIT: usize = 64 * 1024;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Errors on a server connection. Display texts never contain the upstream password.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("timed out connecting to the server")]
    ConnectTimeout,
    #[error("TLS: {0}")]
    Tls(String),
    /// The server's own message (with its SQLSTATE), never anything we sent.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("the server asked for an unsupported authentication method: {0}")]
    UnsupportedAuth(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An ErrorResponse from the server.
    #[error("{severity} {code}: {message}")]
    Db {
        code: String,
        message: String,
        severity: String,
    },
    /// The upstream's configuration cannot be used (bad URL, zero timeout, ...).
    #[error("invalid upstream configuration: {0}")]
    Config(String),
}

impl From<ErrorFields> for ServerError {
    fn from(e: ErrorFields) -> Self {
        ServerError::Db {
            code: e.code,
            message: e.message,
            severity: e.severity,
        }
    }
}

/// A raw, authenticated server connection.
pub struct ServerConn {
    pub stream: ServerStream,
    /// Bytes read from the server and not yet consumed (the relay continues from here).
    pub read_buf: BytesMut,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// This backend's start time (µs since the epoch), once a caller has read it; with
    /// `backend_pid` it identifies the backend for the signed tenant context.
    pub backend_start_micros: Option<i64>,
    /// Current GUC_REPORT parameters as last reported by the server (ParameterStatus); the
    /// relay updates it too.
    pub params: BTreeMap<String, String>,
    /// Last ReadyForQuery status byte: b'I' idle, b'T' in transaction, b'E' failed transaction.
    pub tx_status: u8,
    /// Set when the connection must not return to the pool; `has_broken` reports it.
    pub broken: bool,
    /// Where a CancelRequest for this backend must be sent.
    pub cancel_addr: SocketAddr,
    /// Process-unique id, for logs and metrics.
    pub id: u64,
    pub upstream: Arc<str>,
    /// Transaction mode: the named statements pgtenant prepared on this connection for its
    /// clients (travels with the connection through the pool; emptied by `reset`). `None`
    /// until a transaction-mode session first attaches it; never used in session mode.
    pub prepared: Option<crate::prepared::ServerStatements>,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("upstream", &self.upstream)
            .field("backend_pid", &self.backend_pid)
            .field("tx_status", &(self.tx_status as char))
            .field("broken", &self.broken)
            .field("tls", &matches!(self.stream, ServerStream::Tls(_)))
            .finish_non_exhaustive()
    }
}

impl ServerConn {
    /// TCP connect (nodelay), TLS per `tls` (SSLRequest; `Prefer` falls back to plaintext
    /// on 'N', `Require` fails), StartupMessage 3.0 with only user, database and
    /// `application_name=pgtenant`, then SCRAM-SHA-256 / md5 / cleartext authentication,
    /// collecting ParameterStatus and BackendKeyData until ReadyForQuery. The whole
    /// exchange runs under `connect_timeout`.
    ///
    /// Errors: `ConnectTimeout`, `Io`, `Tls`, `AuthFailed` (28xxx from the server),
    /// `UnsupportedAuth`, `Db` (e.g. 3D000 unknown database, 53300 too many connections),
    /// `Protocol`.
    pub async fn connect(
        upstream: Arc<str>,
        target: &UpstreamTarget,
        tls: &ServerTls,
        connect_timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(connect_timeout, Self::open(upstream, target, tls)).await {
            Ok(result) => result,
            Err(_) => Err(ServerError::ConnectTimeout),
        }
    }

    async fn open(
        upstream: Arc<str>,
        target: &UpstreamTarget,
        tls: &ServerTls,
    ) -> Result<ServerConn, ServerError> {
        let tcp = TcpStream::connect(target.addr()).await?;
        tcp.set_nodelay(true)?;
        let cancel_addr = tcp.peer_addr()?;
        let stream = negotiate_tls(tcp, &target.host, tls).await?;
        let mut conn = ServerConn {
            stream,
            read_buf: BytesMut::with_capacity(8 * 1024),
            backend_pid: 0,
            backend_secret: 0,
            backend_start_micros: None,
            params: BTreeMap::new(),
            tx_status: b'I',
            broken: true,
            cancel_addr,
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            upstream,
            prepared: None,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", target.user.as_str()),
                ("database", target.database.as_str()),
                ("application_name", APPLICATION_NAME),
            ],
            &mut out,
        )?;
        conn.write_all(&out).await?;
        conn.authenticate(target).await?;
        conn.finish_startup().await?;
        conn.broken = false;
        tracing::debug!(
            conn = conn.id,
            upstream = %conn.upstream,
            backend_pid = conn.backend_pid,
            tls = matches!(conn.stream, ServerStream::Tls(_)),
            "server connection established"
        );
        Ok(conn)
    }

    /// Answers authentication requests until AuthenticationOk.
    async fn authenticate(&mut self, target: &UpstreamTarget) -> Result<(), ServerError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                AUTHENTICATION_TAG => {}
                ERROR_RESPONSE_TAG => return Err(auth_error(ErrorFields::parse(&body))),
                NOTICE_RESPONSE_TAG => continue,
                wire::NEGOTIATE_PROTOCOL_VERSION_TAG => {
                    return Err(ServerError::Protocol(
                        "server does not support protocol 3.0".into(),
                    ))
                }
                _ => return Err(unexpected(tag, "authentication")),
            }
            let (kind, data) = match body.split_first_chunk::<4>() {
                Some((kind, data)) => (i32::from_be_bytes(*kind), data),
                None => return Err(ServerError::Protocol("short authentication message".into())),
            };
            let mut out = BytesMut::new();
            match kind {
                0 => return Ok(()),
                3 => frontend::password_message(password(target)?, &mut out)?,
                5 => {
                    let salt = data
                        .first_chunk::<4>()
                        .ok_or_else(|| ServerError::Protocol("md5 request without salt".into()))?;
                    let hash = md5_hash(target.user.as_bytes(), password(target)?, *salt);
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                10 => {
                    let offered: Vec<&str> = wire::cstrs(data).collect();
                    // SCRAM-SHA-256-PLUS is offered over TLS; plain SCRAM-SHA-256 is always
                    // offered with it. Announcing "n" (no channel binding) is correct then:
                    // "y" would make the server suspect a downgrade and refuse.
                    if !offered.contains(&SCRAM_SHA_256) {
                        return Err(ServerError::UnsupportedAuth(format!(
                            "SASL mechanisms {offered:?}"
                        )));
                    }
                    let client = ScramSha256::new(password(target)?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out)?;
                    scram = Some(client);
                }
                11 => {
                    let client = scram.as_mut().ok_or_else(|| {
                        ServerError::Protocol("SASL continue before start".into())
                    })?;
                    client
                        .update(data)
                        .map_err(|e| ServerError::Protocol(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(client.message(), &mut out)?;
                }
                12 => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| ServerError::Protocol("SASL final before start".into()))?;
                    client.finish(data).map_err(|e| {
                        ServerError::AuthFailed(format!("server's SCRAM signature rejected: {e}"))
                    })?;
                    continue;
                }
                2 => return Err(ServerError::UnsupportedAuth("Kerberos V5".into())),
                6 => return Err(ServerError::UnsupportedAuth("SCM credentials".into())),
                7 | 8 => return Err(ServerError::UnsupportedAuth("GSSAPI".into())),
                9 => return Err(ServerError::UnsupportedAuth("SSPI".into())),
                other => {
                    return Err(ServerError::UnsupportedAuth(format!(
                        "request code {other}"
                    )))
                }
            }
            self.write_all(&out).await?;
        }
    }

    /// After AuthenticationOk: ParameterStatus and BackendKeyData until ReadyForQuery.
    async fn finish_startup(&mut self) -> Result<(), ServerError> {
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                PARAMETER_STATUS_TAG => self.record_parameter(&body),
                BACKEND_KEY_DATA_TAG => {
                    let Some((pid, rest)) = body.split_first_chunk::<4>() else {
                        return Err(ServerError::Protocol("short BackendKeyData".into()));
                    };
                    let Some(secret) = rest.first_chunk::<4>() else {
                        return Err(ServerError::Protocol("short BackendKeyData".into()));
                    };
                    self.backend_pid = i32::from_be_bytes(*pid);
                    self.backend_secret = i32::from_be_bytes(*secret);
                }
                READY_FOR_QUERY_TAG => {
                    self.tx_status = body.first().copied().unwrap_or(b'I');
                    return Ok(());
                }
                ERROR_RESPONSE_TAG => return Err(ErrorFields::parse(&body).into()),
                NOTICE_RESPONSE_TAG => {}
                _ => return Err(unexpected(tag, "startup")),
            }
        }
    }

    /// Sets session settings (`set_config(name, value, false)` for each pair) in one round
    /// trip with the extended protocol; names and values travel as bind parameters, so they
    /// never appear in statement text (pg_stat_activity, pg_stat_statements). Uses the
    /// unnamed statement and portal. `params` is updated from ParameterStatus.
    ///
    /// An empty slice returns `Ok(())` without I/O. An ErrorResponse gives `ServerError::Db`;
    /// the connection stays usable (`broken == false`) when ReadyForQuery followed it. Any
    /// other failure, and cancellation, leave `broken == true`.
    pub async fn apply_settings(&mut self, settings: &[(&str, &str)]) -> Result<(), ServerError> {
        if settings.is_empty() {
            return Ok(());
        }
        let sql = wire::set_config_sql(settings.len());
        let types: Vec<u32> = std::iter::repeat_n(wire::TEXT_OID, settings.len() * 2).collect();
        let values: Vec<&str> = settings
            .iter()
            .flat_map(|(name, value)| [*name, *value])
            .collect();
        self.query_rows(&sql, &types, &values).await.map(drop)
    }

    /// Parse/Bind/Execute/Sync of `sql` (unnamed statement) with text-format `params` (types
    /// from `types`; 0 or missing lets the server infer), reading to ReadyForQuery. Returns
    /// the DataRow bodies. Values travel only as bind parameters, never in the SQL text.
    pub async fn query_rows(
        &mut self,
        sql: &str,
        types: &[u32],
        params: &[&str],
    ) -> Result<Vec<Bytes>, ServerError> {
        let mut out = BytesMut::new();
        frontend::parse("", sql, types.iter().copied(), &mut out)?;
        let values = params.iter().copied();
        frontend::bind(
            "",
            "",
            [0i16], // all parameters in text format
            values,
            |v, buf| {
                buf.put_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            [0i16],
            &mut out,
        )
        .map_err(|e| match e {
            frontend::BindError::Conversion(e) => ServerError::Protocol(e.to_string()),
            frontend::BindError::Serialization(e) => ServerError::Io(e),
        })?;
        frontend::execute("", 0, &mut out)?;
        frontend::sync(&mut out);
        let mut rows = Vec::new();
        self.round_trip(&out, Some(&mut rows)).await?;
        Ok(rows)
    }

    /// Runs `sql` with the simple query protocol and reads to ReadyForQuery, ignoring rows.
    /// The first ErrorResponse becomes `ServerError::Db`. Meant for short control
    /// statements: messages over 16 MiB are refused and break the connection. A COPY FROM
    /// STDIN is failed on purpose; COPY TO STDOUT output is discarded.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.round_trip(&out, None).await
    }

    /// Makes the connection clean for the next client: ROLLBACK when not idle, then
    /// DISCARD ALL (temp tables, prepared statements, cursors, advisory locks, LISTEN,
    /// session settings). On any failure or after `RESET_TIMEOUT` sets `broken = true`.
    ///
    /// Call this BEFORE dropping the pool guard: bb8 checks connections in synchronously
    /// in `Drop`, so there is no later point to do I/O. Refuses (and breaks the connection)
    /// when `read_buf` holds unread server bytes: the protocol state is unknown then.
    pub async fn reset(&mut self) -> Result<(), ServerError> {
        let result = match tokio::time::timeout(RESET_TIMEOUT, self.reset_steps()).await {
            Ok(result) => result,
            Err(_) => Err(ServerError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("reset did not finish within {RESET_TIMEOUT:?}"),
            ))),
        };
        if let Err(e) = &result {
            self.broken = true;
            tracing::debug!(conn = self.id, upstream = %self.upstream, error = %e, "reset failed");
        }
        result
    }

    async fn reset_steps(&mut self) -> Result<(), ServerError> {
        // Whatever happens next, no statement pgtenant prepared may be assumed to survive:
        // a failed reset destroys the connection, a confirmed one dropped them all.
        if let Some(statements) = self.prepared.as_mut() {
            statements.clear();
        }
        if self.tx_status != b'I' {
            self.simple_query("ROLLBACK").await?;
        }
        self.simple_query("DISCARD ALL").await?;
        if self.tx_status != b'I' {
            return Err(ServerError::Protocol(format!(
                "still in transaction state '{}' after reset",
                self.tx_status as char
            )));
        }
        Ok(())
    }

    /// Cheap liveness check for an idle connection, without a round trip: polls the socket
    /// once. Err (and `broken = true`) when the server closed it or sent anything other
    /// than ParameterStatus / notices while idle; a FATAL ErrorResponse (e.g. 57P01 after
    /// a server restart) is returned as `ServerError::Db`. Cannot see a silently dead peer
    /// (no FIN): the next round trip finds that.
    pub async fn check_idle(&mut self) -> Result<(), ServerError> {
        if self.broken {
            return Err(ServerError::Protocol("connection is marked broken".into()));
        }
        let mut scratch = [0u8; 1024];
        let mut closed = false;
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            let stream = &mut self.stream;
            let polled = poll_fn(|cx| match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
            match polled {
                None => break,
                Some(Ok(())) if rb.filled().is_empty() => {
                    closed = true;
                    break;
                }
                Some(Ok(())) => {
                    self.read_buf.extend_from_slice(rb.filled());
                    if self.read_buf.len() > IDLE_READ_LIMIT {
                        break;
                    }
                }
                Some(Err(e)) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        // What the server said before closing (e.g. FATAL 57P01) explains it best.
        self.consume_idle_messages()?;
        if closed {
            self.broken = true;
            return Err(ServerError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the idle connection",
            )));
        }
        Ok(())
    }

    /// Handles what a server may send between queries; anything else breaks the connection.
    fn consume_idle_messages(&mut self) -> Result<(), ServerError> {
        loop {
            let frame = match wire::split_frame(&mut self.read_buf, MAX_CONTROL_FRAME) {
                Ok(Some(frame)) => frame,
                Ok(None) if self.read_buf.is_empty() => return Ok(()),
                Ok(None) => {
                    self.broken = true;
                    return Err(ServerError::Protocol(
                        "partial message from the server while idle".into(),
                    ));
                }
                Err(e) => {
                    self.broken = true;
                    return Err(ServerError::Protocol(e));
                }
            };
            match frame {
                (PARAMETER_STATUS_TAG, body) => self.record_parameter(&body),
                (NOTICE_RESPONSE_TAG | NOTIFICATION_RESPONSE_TAG, _) => {}
                (ERROR_RESPONSE_TAG, body) => {
                    self.broken = true;
                    return Err(ErrorFields::parse(&body).into());
                }
                (tag, _) => {
                    self.broken = true;
                    return Err(unexpected(tag, "idle"));
                }
            }
        }
    }

    /// Sends `out` and reads to ReadyForQuery. `broken` is true while the exchange is in
    /// flight, so a cancelled or failed exchange leaves the connection marked.
    async fn round_trip(
        &mut self,
        out: &[u8],
        mut rows: Option<&mut Vec<Bytes>>,
    ) -> Result<(), ServerError> {
        if self.broken {
            return Err(ServerError::Protocol("connection is marked broken".into()));
        }
        if !self.read_buf.is_empty() {
            self.broken = true;
            return Err(ServerError::Protocol(
                "unread server data before a control query; state unknown".into(),
            ));
        }
        self.broken = true;
        self.write_all(out).await?;
        let mut first_error: Option<ErrorFields> = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                READY_FOR_QUERY_TAG => {
                    self.tx_status = body.first().copied().unwrap_or(b'I');
                    break;
                }
                ERROR_RESPONSE_TAG => {
                    let e = ErrorFields::parse(&body);
                    if e.ends_session() {
                        return Err(e.into());
                    }
                    first_error.get_or_insert(e);
                }
                PARAMETER_STATUS_TAG => self.record_parameter(&body),
                DATA_ROW_TAG => {
                    if let Some(rows) = rows.as_deref_mut() {
                        rows.push(body);
                    }
                }
                COPY_IN_RESPONSE_TAG => {
                    let mut fail = BytesMut::new();
                    frontend::copy_fail("COPY FROM STDIN is not supported here", &mut fail)?;
                    self.write_all(&fail).await?;
                }
                wire::COPY_BOTH_RESPONSE_TAG => return Err(unexpected(tag, "a control query")),
                // Rows, CommandComplete, ParseComplete, BindComplete, notices, COPY OUT data.
                _ => {}
            }
        }
        self.broken = false;
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    fn record_parameter(&mut self, body: &[u8]) {
        if let Some((name, value)) = wire::parameter_status(body) {
            self.params.insert(name, value);
        }
    }

    /// Reads one complete message (tag, body). Cancel-safe: partial data stays in `read_buf`.
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ServerError> {
        loop {
            if let Some(frame) = wire::split_frame(&mut self.read_buf, MAX_CONTROL_FRAME)
                .map_err(ServerError::Protocol)?
            {
                return Ok(frame);
            }
            self.read_buf.reserve(8 * 1024);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ServerError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    async fn write_all(&mut self, out: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

impl Drop for ServerConn {
    /// Best effort, without blocking: say goodbye (Terminate, and close_notify over TLS) so
    /// the server logs a clean disconnect instead of an unexpected EOF or reset.
    fn drop(&mut self) {
        match &mut self.stream {
            ServerStream::Plain(tcp) => {
                let _ = tcp.try_write(&wire::TERMINATE);
            }
            ServerStream::Tls(tls) => {
                let (tcp, session) = tls.get_mut();
                if io::Write::write_all(&mut session.writer(), &wire::TERMINATE).is_ok() {
                    session.send_close_notify();
                    while session.wants_write() {
                        match session.write_tls(&mut TryWriter(tcp)) {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
            }
        }
    }
}

/// `io::Write` over a tokio socket that never blocks (WouldBlock instead).
struct TryWriter<'a>(&'a TcpStream);

impl io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SSLRequest and TLS handshake per the configured mode.
async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    tls: &ServerTls,
) -> Result<ServerStream, ServerError> {
    let Some(config) = tls
        .client_config()
        .filter(|_| tls.mode() != ServerTlsMode::Disable)
    else {
        return Ok(ServerStream::Plain(tcp));
    };
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    // Exactly one byte: anything the server sent after it must not be read as plaintext.
    match tcp.read_u8().await? {
        b'S' => {}
        b'N' if tls.mode() == ServerTlsMode::Prefer => return Ok(ServerStream::Plain(tcp)),
        b'N' => return Err(ServerError::Tls("the server does not accept TLS".into())),
        other => {
            return Err(ServerError::Protocol(format!(
                "unexpected answer '{}' to SSLRequest",
                other.escape_ascii()
            )))
        }
    }
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ServerError::Tls(format!("invalid server name {host:?}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

fn password(target: &UpstreamTarget) -> Result<&[u8], ServerError> {
    target
        .password
        .as_deref()
        .map(str::as_bytes)
        .ok_or_else(|| {
            ServerError::AuthFailed(
                "the server asked for a password but the upstream URL has none".into(),
            )
        })
}

/// Class 28 (invalid authorization) becomes `AuthFailed` with the server's text.
fn auth_error(e: ErrorFields) -> ServerError {
    if e.code.starts_with("28") {
        ServerError::AuthFailed(format!("{} (SQLSTATE {})", e.message, e.code))
    } else {
        e.into()
    }
}

fn unexpected(tag: u8, during: &str) -> ServerError {
    ServerError::Protocol(format!(
        "unexpected server message '{}' during {during}",
        tag.escape_ascii()
    ))
}
