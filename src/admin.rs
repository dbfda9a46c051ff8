//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics as m;
use crate::server::Shared;

pub async fn spawn(
    addr: SocketAddr,
    shared: Arc<Shared>,
    handle: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            let handle = handle.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&req, &shared, &handle, &shutdown);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    shared: &Shared,
    handle: &PrometheusHandle,
    shutdown: &watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => {
            refresh_pool_gauges(shared);
            (StatusCode::OK, handle.render())
        }
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if *shutdown.borrow() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        ),
        "/readyz" => (StatusCode::OK, "ready\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Pool gauges are read from bb8 at scrape time, so they are exact and cost nothing between scrapes.
fn refresh_pool_gauges(shared: &Shared) {
    let rt = shared.runtime();
    let directory = rt
        .directory
        .as_ref()
        .map(|d| d.pool_stats())
        .unwrap_or_default();
    for s in rt.pools.stats().into_iter().chain(directory) {
        let up = s.name.to_string();
        metrics::gauge!(m::POOL_SIZE, "upstream" => up.clone()).set(s.size as f64);
        metrics::gauge!(m::POOL_CONNECTIONS, "upstream" => up.clone()).set(s.connections as f64);
        let in_use = s.connections.saturating_sub(s.idle);
        metrics::gauge!(m::POOL_IN_USE, "upstream" => up.clone()).set(in_use as f64);
        metrics::gauge!(m::POOL_IDLE, "upstream" => up.clone()).set(s.idle as f64);
        metrics::gauge!(m::POOL_WAITING, "upstream" => up).set(s.pending_waiters as f64);
    }
}
