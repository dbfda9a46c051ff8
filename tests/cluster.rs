//! Two pgtenant processes on loopback in front of the same PostgreSQL, each the other's
//! peer: a CancelRequest that reaches the replica which did not issue the key is forwarded
//! to the one that did.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::serve::{config_text, free_addr, metric, Serve};
use pgtenant::cancel::ClientKey;
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;

/// Starts replica `id` with both replicas as peers (its own entry is skipped).
async fn replica(dir: &std::path::Path, id: u8, addrs: &[(SocketAddr, SocketAddr)]) -> Serve {
    let (addr, admin) = addrs[usize::from(id) - 1];
    let peers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, (a, _))| format!("{{ id = {}, addr = \"{a}\" }}", i + 1))
        .collect();
    let text = format!(
        "{}\n[cluster]\nreplica_id = {id}\npeers = [{}]\nforward_timeout = \"2s\"\n",
        config_text(addr, admin),
        peers.join(", ")
    );
    let path = dir.join(format!("replica-{id}.toml"));
    std::fs::write(&path, text).expect("write config");
    Serve::start(&path, addr, admin).await
}

/// Waits (10 s at most) until `series` in the replica's /metrics reaches `want`.
async fn wait_for_metric(serve: &Serve, series: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric(&serve.metrics().await, series);
        if value >= want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send_cancel(addr: SocketAddr, key: ClientKey) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&pgtenant::protocol::messages::cancel_request(
        key.pid, key.secret,
    ))
    .await
    .unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_other_replica_reaches_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [(free_addr(), free_addr()), (free_addr(), free_addr())];
    let a = replica(dir.path(), 1, &addrs).await;
    let b = replica(dir.path(), 2, &addrs).await;

    let client = common::connect(a.addr, "acme").await;
    let token = client.cancel_token();
    let to_b = b.addr;
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tcp = tokio::net::TcpStream::connect(to_b).await.unwrap();
        token.cancel_query_raw(tcp, NoTls).await
    });
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("the query is cancelled");
    assert_eq!(common::sqlstate(&err), "57014");
    canceller.await.unwrap().unwrap();
    client.simple_query("SELECT 1").await.unwrap();

    let forwarded = r#"pgtenant_cancel_requests_total{result="forwarded_peer"}"#;
    assert_eq!(wait_for_metric(&b, forwarded, 1.0).await, 1.0);
    let local = r#"pgtenant_cancel_requests_total{result="forwarded"}"#;
    assert_eq!(
        wait_for_metric(&a, local, 1.0).await,
        1.0,
        "A cancelled on its server"
    );
    assert_eq!(
        metric(&b.metrics().await, local),
        0.0,
        "B had nothing to cancel itself"
    );
    assert_eq!(
        metric(&a.metrics().await, forwarded),
        0.0,
        "A did not bounce it back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_unknown_replicas_and_spent_hops_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [(free_addr(), free_addr()), (free_addr(), free_addr())];
    let a = replica(dir.path(), 1, &addrs).await;
    let mut rng = rand::thread_rng();

    // Replica 9 is in nobody's peer list.
    let stranger = ClientKey {
        pid: pgtenant::cluster::issue_pid(9, &mut rng),
        secret: 42,
    };
    send_cancel(a.addr, stranger).await;
    let unknown = r#"pgtenant_cancel_requests_total{result="unknown_peer"}"#;
    assert_eq!(wait_for_metric(&a, unknown, 1.0).await, 1.0);

    // A key for replica 2 that was forwarded once already is not forwarded again.
    let issued = ClientKey {
        pid: pgtenant::cluster::issue_pid(2, &mut rng),
        secret: 43,
    };
    let hopped = pgtenant::cluster::after_hop(issued).unwrap();
    send_cancel(a.addr, hopped).await;
    let looped = r#"pgtenant_cancel_requests_total{result="peer_loop"}"#;
    assert_eq!(wait_for_metric(&a, looped, 1.0).await, 1.0);

    // Replica 2 is listed but not running: the forward fails and is counted.
    send_cancel(a.addr, issued).await;
    let failed = r#"pgtenant_cancel_requests_total{result="peer_failed"}"#;
    assert_eq!(wait_for_metric(&a, failed, 1.0).await, 1.0);

    // The client session of a keeps working throughout.
    let client = common::connect(a.addr, "acme").await;
    client.simple_query("SELECT 1").await.unwrap();
}
