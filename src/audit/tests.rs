//! The audit table against a real PostgreSQL: `init` (idempotent, insert-only writer,
//! refusals) and the `Shipper` (exactly-once, every column round-trips, outage and recovery).

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::schema::{init, TableName};
use super::ship::Shipper;
use super::AuditRecord;
use crate::embedded_pg::TempPg;

/// A record with every field set (so a round trip checks every column).
pub(crate) fn sample_record() -> AuditRecord {
    AuditRecord {
        event_instance: "inst-a".into(),
        event_seq: 1,
        access_time_us: 1_767_225_600_123_456,
        event: "statement".into(),
        tenant_id: Some("acme".into()),
        user_id: Some("alice@acme.com".into()),
        session_id: Some(42),
        upstream: Some("shared".into()),
        client_ip: Some("10.1.2.3".into()),
        client_port: Some(54321),
        user_agent: Some("psql".into()),
        table_name: Some("public.invoices".into()),
        tables: vec![
            "public.invoices".into(),
            "customers".into(),
            "\"Odd\"\"Name\"".into(),
        ],
        operation: Some("SELECT".into()),
        success: true,
        sqlstate: Some("00000".into()),
        command_tag: Some("SELECT 5".into()),
        rows: Some(5),
        duration_us: Some(1234),
        fingerprint: Some("a1b2c3d4e5f60718".into()),
        statement: Some("SELECT * FROM invoices WHERE id = 'it''s'".into()),
        reason: Some("none".into()),
        token_kid: Some("kid-1".into()),
        token_jti: Some("jti-1".into()),
        token_sha256: Some("0123456789abcdef".into()),
        client_bytes: Some(100),
        server_bytes: Some(2000),
        statements: Some(3),
    }
}

/// A sparse record: what an auth failure looks like.
fn auth_failure(seq: i64) -> AuditRecord {
    AuditRecord {
        event_instance: "inst-a".into(),
        event_seq: seq,
        access_time_us: 1_767_225_600_000_000 + seq,
        event: "auth_failure".into(),
        tenant_id: None,
        user_id: None,
        session_id: None,
        upstream: None,
        client_ip: Some("::1".into()),
        client_port: None,
        user_agent: None,
        table_name: None,
        tables: vec![],
        operation: None,
        success: false,
        sqlstate: Some("28P01".into()),
        command_tag: None,
        rows: None,
        duration_us: None,
        fingerprint: None,
        statement: None,
        reason: Some("bad signature".into()),
        token_kid: None,
        token_jti: None,
        token_sha256: None,
        client_bytes: None,
        server_bytes: None,
        statements: None,
    }
}

const WRITER: &str = "audit_writer";
/// Has a quote and a backslash: the role's password must survive quoting.
const WRITER_PW: &str = "pa'ss\\word";
const WRITER_PW_URL: &str = "pa%27ss%5Cword";
const DB: &str = "audit";

fn admin_url(pg: &TempPg) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres",
        pg.socket_dir.display(),
        pg.port
    )
}

fn writer_url(pg: &TempPg) -> String {
    pg.tcp_url(WRITER, WRITER_PW_URL, DB)
}

fn table() -> TableName {
    TableName::parse("audit_tenant_access").unwrap()
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn expect_denied(client: &Client, sql: &str) {
    let err = client.batch_execute(sql).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {err}"
    );
}

#[tokio::test]
async fn init_is_idempotent_and_the_writer_may_only_insert() {
    let pg = TempPg::start_async().await.unwrap();
    let first = init(&admin_url(&pg), &writer_url(&pg), &table())
        .await
        .unwrap();
    assert!(first.database_created && first.role_created, "{first:?}");
    let second = init(&admin_url(&pg), &writer_url(&pg), &table())
        .await
        .unwrap();
    assert!(
        !second.database_created && !second.role_created,
        "{second:?}"
    );
    assert!(!second.to_string().contains(WRITER_PW));

    // The password works over TCP (scram-sha-256), quote and backslash included.
    let writer = connect(&writer_url(&pg)).await;
    let insert =
        "INSERT INTO public.audit_tenant_access (event, event_instance, event_seq, success)
                  VALUES ('statement', 'manual', 1, true)";
    let idempotent = format!("{insert} ON CONFLICT DO NOTHING");
    assert_eq!(writer.execute(&idempotent, &[]).await.unwrap(), 1);
    assert_eq!(writer.execute(&idempotent, &[]).await.unwrap(), 0);
    let err = writer.execute(insert, &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    // Why the shipper names no conflict target: PostgreSQL wants SELECT on the arbiter's
    // columns for both forms, and the writer has none.
    expect_denied(
        &writer,
        &format!("{insert} ON CONFLICT (event_instance, event_seq) DO NOTHING"),
    )
    .await;
    expect_denied(
        &writer,
        &format!("{insert} ON CONFLICT ON CONSTRAINT audit_tenant_access_event_key DO NOTHING"),
    )
    .await;
    expect_denied(&writer, "SELECT * FROM public.audit_tenant_access").await;
    expect_denied(&writer, "SELECT count(*) FROM public.audit_tenant_access").await;
    expect_denied(
        &writer,
        "UPDATE public.audit_tenant_access SET success = false",
    )
    .await;
    expect_denied(&writer, "DELETE FROM public.audit_tenant_access").await;
    expect_denied(&writer, "TRUNCATE public.audit_tenant_access").await;
    expect_denied(&writer, "DROP TABLE public.audit_tenant_access").await;
}

#[tokio::test]
async fn init_refuses_writers_that_could_remove_rows() {
    let pg = TempPg::start_async().await.unwrap();
    let admin = pg.admin_client("postgres").await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE boss SUPERUSER LOGIN;
             CREATE ROLE owner_role LOGIN;
             CREATE ROLE schema_owner LOGIN;",
        )
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE other").await.unwrap();
    let url = |user: &str| pg.tcp_url(user, "secretpw", "other");

    let err = init(&admin_url(&pg), &url("boss"), &table())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("superuser"), "{err:#}");
    let err = init(&admin_url(&pg), &url("postgres"), &table())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("admin role"), "{err:#}");

    // A table that exists already, owned by the would-be writer.
    let other = pg.admin_client("other").await.unwrap();
    other
        .batch_execute(&super::schema::table_sql(&table()))
        .await
        .unwrap();
    other
        .batch_execute("ALTER TABLE public.audit_tenant_access OWNER TO owner_role")
        .await
        .unwrap();
    let err = init(&admin_url(&pg), &url("owner_role"), &table())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("owns"), "{err:#}");

    // A schema owned by the would-be writer: it could drop the table.
    other
        .batch_execute("CREATE SCHEMA compliance AUTHORIZATION schema_owner")
        .await
        .unwrap();
    let in_schema = TableName::parse("compliance.trail").unwrap();
    let err = init(&admin_url(&pg), &url("schema_owner"), &in_schema)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("schema"), "{text}");
    assert!(!text.contains("secretpw"), "{text}");
    // The refusal rolled everything back.
    let exists: bool = other
        .query_one("SELECT to_regclass('compliance.trail') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
}

/// Every column of the table, read back as the record that was shipped.
async fn read_back(admin: &Client) -> Vec<AuditRecord> {
    let rows = admin
        .query(
            "SELECT event_instance, event_seq,
                    (extract(epoch FROM access_time) * 1000000)::bigint,
                    event, tenant_id::text, user_id::text, session_id, upstream,
                    host(client_ip), client_port, user_agent, table_name::text, tables,
                    operation::text, success, sqlstate, command_tag, rows, duration_us,
                    fingerprint, statement, reason, token_kid, token_jti, token_sha256,
                    client_bytes, server_bytes, statements
             FROM public.audit_tenant_access ORDER BY event_instance, event_seq",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| AuditRecord {
            event_instance: r.get(0),
            event_seq: r.get(1),
            access_time_us: r.get(2),
            event: r.get(3),
            tenant_id: r.get(4),
            user_id: r.get(5),
            session_id: r.get(6),
            upstream: r.get(7),
            client_ip: r.get(8),
            client_port: r.get(9),
            user_agent: r.get(10),
            table_name: r.get(11),
            tables: r.get::<_, Option<Vec<String>>>(12).unwrap_or_default(),
            operation: r.get(13),
            success: r.get(14),
            sqlstate: r.get(15),
            command_tag: r.get(16),
            rows: r.get(17),
            duration_us: r.get(18),
            fingerprint: r.get(19),
            statement: r.get(20),
            reason: r.get(21),
            token_kid: r.get(22),
            token_jti: r.get(23),
            token_sha256: r.get(24),
            client_bytes: r.get(25),
            server_bytes: r.get(26),
            statements: r.get(27),
        })
        .collect()
}

#[tokio::test]
async fn shipping_is_exactly_once_and_every_column_round_trips() {
    let pg = TempPg::start_async().await.unwrap();
    init(&admin_url(&pg), &writer_url(&pg), &table())
        .await
        .unwrap();
    let mut shipper = Shipper::new(&writer_url(&pg), table(), Duration::from_secs(5)).unwrap();

    let full = sample_record();
    let batch_a = vec![full.clone(), auth_failure(2)];
    let batch_b = vec![auth_failure(3), auth_failure(4), auth_failure(5)];
    let out = shipper.ship(&batch_a, false).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (2, 0));
    let out = shipper.ship(&batch_b, false).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (3, 0));
    // A replay shipped as if it were new (a lost ack): the plain INSERT hits the key and is
    // retried idempotent. Then a batch half old, half new with a key twice in it.
    let out = shipper.ship(&batch_a, false).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (0, 2));
    let mixed = vec![auth_failure(5), auth_failure(6), auth_failure(6)];
    let out = shipper.ship(&mixed, true).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (1, 2));
    assert_eq!(shipper.ship(&[], false).await.unwrap().inserted, 0);

    let admin = pg.admin_client(DB).await.unwrap();
    let back = read_back(&admin).await;
    let mut expected = batch_a.clone();
    expected.extend(batch_b);
    expected.push(auth_failure(6));
    assert_eq!(back, expected);

    // Overlong and NUL-bearing values are stored (cut / replaced), not a poison batch.
    let mut odd = auth_failure(7);
    odd.tenant_id = Some("t".repeat(300));
    odd.reason = Some("nul\0here".into());
    assert_eq!(shipper.ship(&[odd], false).await.unwrap().inserted, 1);
    let row = admin
        .query_one(
            "SELECT length(tenant_id), reason FROM public.audit_tenant_access WHERE event_seq = 7",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 255);
    assert_eq!(row.get::<_, String>(1), "nul\u{FFFD}here");
}

#[tokio::test]
async fn shipping_fails_fast_while_the_server_is_down_and_recovers() {
    let pg = TempPg::start_async().await.unwrap();
    init(&admin_url(&pg), &writer_url(&pg), &table())
        .await
        .unwrap();
    let timeout = Duration::from_secs(3);
    let mut shipper = Shipper::new(&writer_url(&pg), table(), timeout).unwrap();
    assert_eq!(
        shipper
            .ship(&[auth_failure(1)], false)
            .await
            .unwrap()
            .inserted,
        1
    );

    pg.stop_server("fast").unwrap();
    for seq in [2, 3] {
        let started = Instant::now();
        let err = shipper.ship(&[auth_failure(seq)], true).await.unwrap_err();
        assert!(
            started.elapsed() <= timeout + Duration::from_millis(500),
            "{err}"
        );
        assert!(!err.to_string().contains("word"), "{err}");
    }

    pg.start_server().unwrap();
    // The batch that failed is shipped again, plus the one that never went.
    let out = shipper
        .ship(&[auth_failure(2), auth_failure(3)], true)
        .await
        .unwrap();
    assert_eq!((out.inserted, out.duplicates), (2, 0));
    let admin = pg.admin_client(DB).await.unwrap();
    let n: i64 = admin
        .query_one("SELECT count(*) FROM public.audit_tenant_access", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}
