//! The live tenant directory against real PostgreSQL: metadata tables in the seeds' shapes
//! (`customer_domains`, `tenants`), routing per row, NOTIFY invalidation, suspension,
//! a metadata outage (stale answers, then fail closed, then recovery), single-flight lookups,
//! and no secrets in errors, logs or metrics.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtenant::config::{Config, UpstreamConfig};
use pgtenant::embedded_pg::TempPg;
use pgtenant::server::ProxyHandle;
use pgtenant::tenant::directory::Entry;
use pgtenant::tenant::{Directory, DirectoryConfig, TenantId};
use tokio_postgres::Client;

/// The seed's `customer_domains` (seed 000, metadata database `ciso_assistant`).
const CUSTOMER_DOMAINS: &str = "
CREATE TABLE customer_domains (
    customer_subdomain VARCHAR(100) PRIMARY KEY,
    email_domain       VARCHAR(255) NOT NULL,
    database_name      VARCHAR(100) NOT NULL,
    db_host            VARCHAR(255) NOT NULL,
    backend_port       INTEGER,
    is_active          BOOLEAN DEFAULT TRUE
)";

/// The seed's `tenants` (seed 004, the platform database).
const TENANTS: &str = "
CREATE TABLE tenants (
    id            UUID PRIMARY KEY,
    name          VARCHAR(255) NOT NULL,
    database_name VARCHAR(63) UNIQUE NOT NULL,
    is_active     BOOLEAN DEFAULT TRUE,
    created_at    TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    updated_at    TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    created_by    UUID
)";

/// A metadata database in `pg` with `ddl` applied: a reader role's URL (TCP, SCRAM) and a
/// superuser client on it (rows, NOTIFY).
async fn metadata(pg: &TempPg, name: &str, ddl: &str) -> (String, Client) {
    let admin = pg.admin_client("postgres").await.unwrap();
    let (db, role, password) = (
        format!("meta_{name}"),
        format!("dir_{name}"),
        format!("Dir-{name}-pw-7Qx"),
    );
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let meta = pg.admin_client(&db).await.unwrap();
    meta.batch_execute(ddl).await.unwrap();
    meta.batch_execute(&format!(
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
    ))
    .await
    .unwrap();
    (pg.tcp_url(&role, &password, &db), meta)
}

/// A shipped example (`config/<file>`): its template upstream and `[directory]`.
#[derive(serde::Deserialize)]
struct Example {
    upstreams: BTreeMap<String, UpstreamConfig>,
    directory: DirectoryConfig,
}

fn example(file: &str) -> Example {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(file);
    let text = std::fs::read_to_string(path).unwrap();
    let text = regex::Regex::new(r"\$\{[A-Z_]+\}")
        .unwrap()
        .replace_all(&text, "unused");
    toml::from_str(&text).unwrap()
}

/// Installs `example` in `c`: the directory reads `meta_url`; the template upstream connects
/// like the demo's `acme` upstream (127.0.0.1, the demo cluster, role acme_app).
fn install(c: &mut Config, example: Example, meta_url: &str) {
    let mut directory = example.directory;
    directory.url = meta_url.to_owned();
    for (name, mut up) in example.upstreams {
        up.url = c.upstreams["acme"].url.clone();
        c.upstreams.insert(name, up);
    }
    c.directory = Some(directory);
}

/// A directory on `meta_url` with `query`, template `acme`, and the credentials `creds`.
fn directory(meta_url: &str, query: &str, extra: &str) -> DirectoryConfig {
    let text = format!(
        "url = {}\nquery = {}\ntemplate = \"acme\"\n{extra}",
        toml::Value::String(meta_url.into()),
        toml::Value::String(query.into())
    );
    toml::from_str(&text).unwrap()
}

fn running_directory(proxy: &ProxyHandle) -> Arc<Directory> {
    proxy
        .shared
        .runtime()
        .directory
        .clone()
        .expect("[directory] configured")
}

/// Waits until the LISTEN connection is up: from then on NOTIFYs are not missed.
async fn until_listening(directory: &Directory) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !directory.listening() {
        assert!(Instant::now() < deadline, "the directory never LISTENed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn current_database(client: &Client) -> String {
    client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The database a new session of `tenant` lands on, or its error (SQLSTATE, message).
async fn lands_on(addr: SocketAddr, tenant: &str) -> Result<String, (String, String)> {
    let token = common::token(tenant, &format!("user@{tenant}"));
    match common::try_connect(addr, &token).await {
        Ok(client) => Ok(current_database(&client).await),
        Err(e) => Err((
            common::sqlstate(&e),
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        )),
    }
}

/// Polls until a new session of `tenant` gives `want` (a NOTIFY is delivered asynchronously).
async fn until_lands(addr: SocketAddr, tenant: &str, want: &Result<String, (String, String)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = lands_on(addr, tenant).await;
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{tenant}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn db(name: &str) -> Result<String, (String, String)> {
    Ok(name.to_string())
}

fn refused(code: &str, message: &str) -> Result<String, (String, String)> {
    Err((code.to_string(), message.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_domains_example_routes_each_tenant_per_its_row() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "cd_route", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES
           ('acme', 'acme.com', 'acme_db', '127.0.0.1', 8000, true),
           -- [tenants] says techstart -> techstart_db; the directory row wins.
           ('techstart', 'techstart.io', 'acme_db', '127.0.0.1', 8001, true),
           ('oldco', 'oldco.example', 'acme_db', '127.0.0.1', 8002, false)",
    )
    .await
    .unwrap();
    let proxy =
        common::start_proxy(|c| install(c, example("directory-customer-domains.toml"), &url)).await;
    let dir = running_directory(&proxy);
    // Its (re)connect forgets the cache; after that, answers stay cached.
    until_listening(&dir).await;

    assert_eq!(lands_on(proxy.addr, "acme").await, db("acme_db"));
    assert_eq!(lands_on(proxy.addr, "techstart").await, db("acme_db"));
    // No row: the static [tenants] default (the shared database) decides.
    assert_eq!(lands_on(proxy.addr, "initech").await, db("saas"));
    assert_eq!(
        lands_on(proxy.addr, "oldco").await,
        refused("28000", "tenant suspended")
    );

    // Described databases get a pool of their own with a stable, secret-free name.
    let port = pg.port;
    let names: Vec<String> = dir
        .pool_stats()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, vec![format!("dir:127.0.0.1:{port}/acme_db")]);
    // Answers are cached: asking again costs no query.
    let queries = dir.queries();
    assert_eq!(lands_on(proxy.addr, "acme").await, db("acme_db"));
    assert_eq!(dir.queries(), queries);
    let (_, metrics) =
        common::http_get(&format!("http://{}/metrics", proxy.admin_addr.unwrap())).await;
    assert!(
        metrics.contains(&format!(
            "pgtenant_pool_connections{{upstream=\"dir:127.0.0.1:{port}/acme_db\"}}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("pgtenant_directory_lookups_total{result=\"hit\"}"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_example_routes_by_uuid() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "tn_route", TENANTS).await;
    let (active, inactive, unknown) = (
        "6f1c2d3e-4b5a-4c6d-8e7f-901234567890",
        "0a0b0c0d-1111-4222-8333-944455556666",
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
    );
    meta.execute(
        "INSERT INTO tenants (id, name, database_name, is_active) VALUES
           ($1::text::uuid, 'Acme Corp', 'acme_db', true),
           ($2::text::uuid, 'Gone Inc', 'gone_db', false)",
        &[&active, &inactive],
    )
    .await
    .unwrap();
    let proxy = common::start_proxy(|c| install(c, example("directory-tenants.toml"), &url)).await;
    assert_eq!(lands_on(proxy.addr, active).await, db("acme_db"));
    assert_eq!(
        lands_on(proxy.addr, inactive).await,
        refused("28000", "tenant suspended")
    );
    assert_eq!(lands_on(proxy.addr, unknown).await, db("saas"));
    // Not a UUID: no row (the example compares as text), not a query error.
    assert_eq!(lands_on(proxy.addr, "medcorp").await, db("saas"));
    proxy.stop().await;
}

/// A customer_domains query that keeps customers whose database is the shared one on the
/// configured `shared` upstream (RLS), and logs into techstart_db as techstart_app.
const MOVING_QUERY: &str = "
SELECT CASE WHEN database_name = 'saas' THEN 'shared' END AS upstream,
       CASE WHEN database_name <> 'saas' THEN db_host END AS host,
       CASE WHEN database_name <> 'saas' THEN database_name END AS database,
       CASE WHEN database_name = 'techstart_db' THEN 'techstart' END AS credentials,
       is_active AS active
  FROM customer_domains
 WHERE customer_subdomain = $1";

fn techstart_credentials() -> String {
    let password = &common::env().demo.logins["techstart_app"];
    format!("[credentials.techstart]\nuser = \"techstart_app\"\npassword = \"{password}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_tenant_takes_effect_for_new_sessions_on_notify() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "move", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES
           ('medcorp', 'medcorp.example', 'saas', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    let dir_config = directory(
        &url,
        MOVING_QUERY,
        &format!(
            "ttl = \"1h\"\nnegative_ttl = \"1h\"\n{}",
            techstart_credentials()
        ),
    );
    let proxy = common::start_proxy(|c| c.directory = Some(dir_config)).await;
    let dir = running_directory(&proxy);
    until_listening(&dir).await;

    let before = common::connect(proxy.addr, "medcorp").await;
    assert_eq!(current_database(&before).await, "saas");
    let tenant: String = before
        .query_one("SELECT current_setting('app.current_tenant_id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tenant, "medcorp",
        "the shared route pins the tenant setting"
    );

    meta.batch_execute(
        "UPDATE customer_domains SET database_name = 'techstart_db' WHERE customer_subdomain = 'medcorp'",
    )
    .await
    .unwrap();
    // Cached for an hour: without a NOTIFY nothing changes.
    assert_eq!(lands_on(proxy.addr, "medcorp").await, db("saas"));

    meta.batch_execute("NOTIFY pgtenant_directory, 'medcorp'")
        .await
        .unwrap();
    until_lands(proxy.addr, "medcorp", &db("techstart_db")).await;
    // The session opened before the move is untouched.
    assert_eq!(current_database(&before).await, "saas");

    // And back, with a NOTIFY for everything.
    meta.batch_execute(
        "UPDATE customer_domains SET database_name = 'saas' WHERE customer_subdomain = 'medcorp';
         NOTIFY pgtenant_directory, '*'",
    )
    .await
    .unwrap();
    until_lands(proxy.addr, "medcorp", &db("saas")).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_tenant_refuses_new_sessions_with_28000() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "suspend", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES ('acme', 'acme.com', 'acme_db', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    let dir_config = directory(&url, MOVING_QUERY, "ttl = \"1h\"\n");
    let proxy = common::start_proxy(|c| c.directory = Some(dir_config)).await;
    let dir = running_directory(&proxy);
    until_listening(&dir).await;
    let open = common::connect(proxy.addr, "acme").await;

    meta.batch_execute(
        "UPDATE customer_domains SET is_active = false WHERE customer_subdomain = 'acme';
         NOTIFY pgtenant_directory, 'acme'",
    )
    .await
    .unwrap();
    until_lands(proxy.addr, "acme", &refused("28000", "tenant suspended")).await;
    // Suspension refuses new sessions; an open one is not cut off by pgtenant.
    assert_eq!(current_database(&open).await, "acme_db");

    meta.batch_execute(
        "UPDATE customer_domains SET is_active = true WHERE customer_subdomain = 'acme';
         NOTIFY pgtenant_directory, 'acme'",
    )
    .await
    .unwrap();
    until_lands(proxy.addr, "acme", &db("acme_db")).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_outage_serves_cached_answers_then_fails_closed_then_recovers() {
    common::env();
    // A cluster of its own, so that it can be stopped.
    let meta_pg = TempPg::start_async().await.unwrap();
    let (url, meta) = metadata(&meta_pg, "outage", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES ('acme', 'acme.com', 'acme_db', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    drop(meta);
    let dir_config = directory(
        &url,
        MOVING_QUERY,
        "ttl = \"300ms\"\nmax_staleness = \"6s\"\nlookup_timeout = \"1s\"\n",
    );
    let proxy = common::start_proxy(|c| c.directory = Some(dir_config)).await;
    let dir = running_directory(&proxy);
    until_listening(&dir).await;
    assert_eq!(lands_on(proxy.addr, "acme").await, db("acme_db"));

    meta_pg.stop_server("fast").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past the TTL, within max_staleness: the cached answer serves.
    assert_eq!(lands_on(proxy.addr, "acme").await, db("acme_db"));
    assert!(dir.stale_served() >= 1, "the answer was not served stale");
    // A tenant never looked up has nothing cached: refused at once, retryably.
    assert_eq!(
        lands_on(proxy.addr, "medcorp").await,
        refused("57P03", "tenant directory unavailable")
    );
    // Past max_staleness: fail closed.
    until_lands(
        proxy.addr,
        "acme",
        &refused("57P03", "tenant directory unavailable"),
    )
    .await;
    assert!(!dir.listening());

    meta_pg.start_server().unwrap();
    until_lands(proxy.addr, "acme", &db("acme_db")).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_lookups_of_a_tenant_share_one_query() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "flight", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES ('acme', 'acme.com', 'acme_db', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    // Slow on purpose, so that all 20 lookups start while the first query runs.
    let slow = MOVING_QUERY.replace(
        "FROM customer_domains",
        "FROM pg_sleep(0.5), customer_domains",
    );
    let dir_config = directory(&url, &slow, "ttl = \"1h\"\n");
    let proxy = common::start_proxy(|c| c.directory = Some(dir_config)).await;
    let dir = running_directory(&proxy);
    until_listening(&dir).await;

    let round = |dir: Arc<Directory>| async move {
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let lookups: Vec<_> = (0..20)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    dir.lookup(&TenantId::new_validated("acme")).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for l in lookups {
            answers.push(l.await.unwrap().unwrap());
        }
        answers
    };
    let answers = round(dir.clone()).await;
    assert!(answers
        .iter()
        .all(|a| matches!(a, Entry::Found(row) if row.database.as_deref() == Some("acme_db"))));
    assert_eq!(dir.queries(), 1, "20 concurrent first lookups, one query");

    dir.invalidate(Some("acme"));
    round(dir.clone()).await;
    assert_eq!(dir.queries(), 2, "after an invalidation, again one query");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_errors_logs_or_metrics() {
    use common::serve::{config_text, free_addr, Serve};
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "secrets", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES
           ('acme', 'acme.com', 'techstart_db', '127.0.0.1', NULL, true),
           ('globex', 'globex.example', 'acme_db', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    const WRONG: &str = "Wr0ng-Pa55-never-shown";
    let query = "SELECT db_host AS host, database_name AS database,
                        CASE customer_subdomain WHEN 'acme' THEN 'bad' ELSE 'nope' END AS credentials,
                        is_active AS active
                   FROM customer_domains WHERE customer_subdomain = $1";
    let (addr, admin) = (free_addr(), free_addr());
    let text = format!(
        "{}\n[directory]\nurl = {}\nquery = {}\ntemplate = \"acme\"\n[directory.credentials.bad]\nuser = \"techstart_app\"\npassword = \"{WRONG}\"\n",
        config_text(addr, admin),
        toml::Value::String(url.clone()),
        toml::Value::String(query.into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgtenant.toml");
    std::fs::write(&path, text).unwrap();
    let serve = Serve::start(&path, addr, admin).await;

    let wrong_password = lands_on(addr, "acme").await.unwrap_err();
    assert_eq!(wrong_password.0, "08001", "{wrong_password:?}");
    assert!(
        wrong_password.1.contains("dir:127.0.0.1:"),
        "{wrong_password:?}"
    );
    let unknown_ref = lands_on(addr, "globex").await.unwrap_err();
    assert_eq!(unknown_ref.0, "XX000", "{unknown_ref:?}");
    assert!(unknown_ref.1.contains("\"nope\""), "{unknown_ref:?}");

    let metrics = serve.metrics().await;
    let log = serve.log_text();
    let meta_password = "Dir-secrets-pw-7Qx";
    let template_password = &common::env().demo.logins["acme_app"];
    for (what, text) in [
        ("error", format!("{wrong_password:?} {unknown_ref:?}")),
        ("log", log.clone()),
        ("metrics", metrics),
    ] {
        for secret in [WRONG, meta_password, template_password.as_str()] {
            assert!(
                !text.contains(secret),
                "{what} contains a password:\n{text}"
            );
        }
    }
    assert!(log.contains("unusable tenant directory row"), "{log}");
    serve.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_an_unchanged_directory_and_replaces_a_changed_one() {
    let pg = common::env().pg;
    let (url, meta) = metadata(pg, "reload", CUSTOMER_DOMAINS).await;
    meta.batch_execute(
        "INSERT INTO customer_domains VALUES ('medcorp', 'medcorp.example', 'acme_db', '127.0.0.1', NULL, true)",
    )
    .await
    .unwrap();
    let dir_config = directory(&url, MOVING_QUERY, "ttl = \"1h\"\n");
    let config = common::config(|c| c.directory = Some(dir_config.clone()));
    let proxy = pgtenant::server::spawn(config.clone()).await.unwrap();
    let first = running_directory(&proxy);
    assert_eq!(lands_on(proxy.addr, "medcorp").await, db("acme_db"));

    proxy.reload(config.clone()).await.unwrap();
    let kept = running_directory(&proxy);
    assert!(
        Arc::ptr_eq(&first, &kept),
        "an unchanged [directory] is kept"
    );

    // A new query: a new directory, and new sessions follow it.
    let mut changed = config.clone();
    changed.directory = Some(directory(
        &url,
        "SELECT 'shared' AS upstream, true AS active WHERE $1 <> ''",
        "",
    ));
    proxy.reload(changed).await.unwrap();
    assert!(!Arc::ptr_eq(&first, &running_directory(&proxy)));
    assert_eq!(lands_on(proxy.addr, "medcorp").await, db("saas"));

    // No [directory]: only [tenants] routes.
    let mut without = config;
    without.directory = None;
    proxy.reload(without).await.unwrap();
    assert!(proxy.shared.runtime().directory.is_none());
    assert_eq!(lands_on(proxy.addr, "acme").await, db("acme_db"));
    proxy.stop().await;
}
