//! The LISTEN task: one connection to the metadata database that receives invalidations
//! (`NOTIFY <channel>, '<tenant>'`), tells whether the database is reachable, and keeps the
//! staleness gauge current. After every (re)connect the whole cache is forgotten: NOTIFYs sent
//! while it was away were missed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use super::cache::Scope;
use super::lookup::describe;
use super::Inner;
use crate::metrics as m;

/// How often the gauge is refreshed and, while disconnected, a reconnect is tried.
const TICK: Duration = Duration::from_secs(1);

/// Contact with the metadata database, from both the LISTEN connection and the lookups.
pub(super) struct Health {
    state: Mutex<HealthState>,
}

struct HealthState {
    last_ok: Instant,
    failing: bool,
    listening: bool,
    last_query_failure: Option<(Instant, String)>,
}

impl Health {
    pub fn new() -> Self {
        Health {
            state: Mutex::new(HealthState {
                last_ok: Instant::now(),
                failing: false,
                listening: false,
                last_query_failure: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record_ok(&self) {
        let mut s = self.lock();
        s.last_ok = Instant::now();
        s.failing = false;
        s.last_query_failure = None;
    }

    pub fn record_query_failure(&self, reason: &str) {
        let mut s = self.lock();
        s.failing = true;
        s.last_query_failure = Some((Instant::now(), reason.to_owned()));
    }

    fn set_listening(&self, up: bool) {
        if up {
            self.record_ok();
        } else {
            self.lock().failing = true;
        }
        self.lock().listening = up;
    }

    pub fn listening(&self) -> bool {
        self.lock().listening
    }

    /// The reason of a query failure less than `backoff` ago.
    pub fn recent_query_failure(&self, backoff: Duration) -> Option<String> {
        let s = self.lock();
        s.last_query_failure
            .as_ref()
            .filter(|(at, _)| at.elapsed() < backoff)
            .map(|(_, reason)| reason.clone())
    }

    /// Time since the last successful contact while failing; zero while healthy.
    pub fn staleness(&self) -> Duration {
        let s = self.lock();
        if s.failing {
            s.last_ok.elapsed()
        } else {
            Duration::ZERO
        }
    }
}

/// Runs until aborted (when its `Directory` is dropped).
pub(super) async fn run(inner: Arc<Inner>, mut config: tokio_postgres::Config) {
    // A metadata host that vanishes without a FIN is noticed within ~25 s, not TCP's hours.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    loop {
        let reason = listen_once(&inner, &config).await;
        inner.health.set_listening(false);
        tracing::warn!(metadata = %inner.db.addr, %reason, "tenant directory LISTEN connection lost; reconnecting");
        update_gauge(&inner);
        tokio::time::sleep(TICK).await;
    }
}

/// Connects, LISTENs and follows notifications until the connection ends; returns why.
async fn listen_once(inner: &Arc<Inner>, config: &tokio_postgres::Config) -> String {
    if config.get_ssl_mode() == SslMode::Require {
        let tls = match crate::pool::encrypt_only_client_config() {
            Ok(tls) => tls,
            Err(e) => return format!("TLS setup: {e}"),
        };
        match config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await
        {
            Ok((client, conn)) => follow(inner, client, conn).await,
            Err(e) => format!("cannot connect: {}", describe(&e)),
        }
    } else {
        match config.connect(NoTls).await {
            Ok((client, conn)) => follow(inner, client, conn).await,
            Err(e) => format!("cannot connect: {}", describe(&e)),
        }
    }
}

async fn follow<S, T>(inner: &Arc<Inner>, client: Client, mut conn: Connection<S, T>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let channel = &inner.config.channel;
    let sql = format!("LISTEN {}", quote_ident(channel));
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    let mut messages = futures_util::stream::poll_fn(|cx| conn.poll_message(cx));
    let mut tick = tokio::time::interval(TICK);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => match done {
                Ok(()) => {
                    listening = true;
                    // Forget first: whoever sees `listening()` sees no pre-LISTEN answer.
                    inner.invalidate(Scope::Reconnect, None);
                    inner.health.set_listening(true);
                    tracing::info!(metadata = %inner.db.addr, %channel, "tenant directory listening for invalidations");
                }
                Err(e) => return format!("LISTEN failed: {}", describe(&e)),
            },
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == channel => {
                    let payload = n.payload().trim();
                    match payload {
                        "" | "*" => inner.invalidate(Scope::All, None),
                        tenant => inner.invalidate(Scope::Tenant, Some(tenant)),
                    }
                    tracing::debug!(payload, "tenant directory invalidation");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return describe(&e),
                None => return "connection closed".into(),
            },
            _ = tick.tick() => {
                if listening {
                    inner.health.record_ok();
                }
                update_gauge(inner);
            }
        }
    }
}

fn update_gauge(inner: &Inner) {
    metrics::gauge!(m::DIRECTORY_STALENESS_SECONDS).set(inner.health.staleness().as_secs_f64());
}

/// A double-quoted SQL identifier.
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
