//! Unit tests of the pure parts: cache freshness and staleness, flights, invalidation
//! epochs, row → target resolution, config validation. The metadata database itself is
//! exercised in `tests/directory.rs`.

use std::time::{Duration, Instant};

use super::cache::{Cache, Cached, Flight};
use super::route::{described_target, pool_name};
use super::*;

const BASE: &str = r#"
[listen]
[jwt]
secret = "0123456789abcdef0123456789abcdef"
[upstreams.shared]
kind = "shared"
url = "postgres://u:p@127.0.0.1:5432/saas"
[upstreams.tmpl]
kind = "dedicated"
url = "postgres://tmpl_user:tmpl-secret@db.internal:6543/postgres"
pool_size = 3
"#;

fn config(directory: &str) -> Result<Config, crate::config::ConfigError> {
    let cfg = Config::parse(&format!("{BASE}\n{directory}"))?;
    cfg.validate()?;
    Ok(cfg)
}

const DIRECTORY: &str = r#"
[directory]
url = "postgres://reader:reader-pw@127.0.0.1:5432/meta"
query = "SELECT database_name AS database, is_active AS active FROM tenants WHERE id::text = $1"
template = "tmpl"
[directory.credentials.techstart]
user = "techstart_app"
password = "very-secret-pw"
"#;

fn row(database: &str) -> DirRow {
    DirRow {
        database: Some(database.into()),
        active: true,
        ..DirRow::default()
    }
}

#[test]
fn defaults_and_redacted_debug() {
    let cfg = config(DIRECTORY).unwrap();
    let d = cfg.directory.as_ref().unwrap();
    assert_eq!(d.ttl, Duration::from_secs(30));
    assert_eq!(d.negative_ttl, Duration::from_secs(5));
    assert_eq!(d.max_staleness, Duration::from_secs(300));
    assert_eq!(d.lookup_timeout, Duration::from_secs(2));
    assert_eq!(d.channel, "pgtenant_directory");
    let debug = format!("{d:?}");
    assert!(!debug.contains("very-secret-pw"), "{debug}");
    assert!(!debug.contains("reader-pw"), "{debug}");
    assert!(debug.contains("techstart_app"), "{debug}");
}

#[test]
fn validation_refuses_what_cannot_work() {
    let cases = [
        (
            DIRECTORY.replace("template = \"tmpl\"", "template = \"nope\""),
            "unknown upstream",
        ),
        (
            DIRECTORY.replace("template = \"tmpl\"", "template = \"shared\""),
            "dedicated",
        ),
        (DIRECTORY.replace("WHERE id::text = $1", ""), "$1"),
        (
            DIRECTORY.replace(
                "postgres://reader:reader-pw@127.0.0.1:5432/meta",
                "mysql://x@y/z",
            ),
            "directory.url",
        ),
        (
            DIRECTORY.replace("user = \"techstart_app\"", "user = \"\""),
            "user",
        ),
        (
            DIRECTORY.replace("template = \"tmpl\"", "template = \"tmpl\"\nchannel = \"\""),
            "channel",
        ),
    ];
    for (text, needle) in cases {
        let err = config(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(
            !err.contains("very-secret-pw") && !err.contains("reader-pw"),
            "{err}"
        );
    }
    let unknown_key =
        format!("{DIRECTORY}\n[directory.credentials.x]\nuser = \"a\"\npasword = \"b\"");
    assert!(config(&unknown_key).is_err());
}

#[test]
fn described_target_takes_null_fields_from_the_template() {
    let cfg = config(DIRECTORY).unwrap();
    let d = cfg.directory.as_ref().unwrap();
    let t = described_target(d, &row("acme_db"), &cfg).unwrap();
    assert_eq!(
        (
            t.host.as_str(),
            t.port,
            t.database.as_str(),
            t.user.as_str()
        ),
        ("db.internal", 6543, "acme_db", "tmpl_user")
    );
    assert_eq!(t.password.as_deref(), Some("tmpl-secret"));
    assert_eq!(pool_name(&t, None), "dir:db.internal:6543/acme_db");

    let full = DirRow {
        host: Some("10.0.0.7".into()),
        port: Some(5433),
        credentials: Some("techstart".into()),
        ..row("techstart_db")
    };
    let t = described_target(d, &full, &cfg).unwrap();
    assert_eq!(
        (t.host.as_str(), t.port, t.user.as_str()),
        ("10.0.0.7", 5433, "techstart_app")
    );
    assert_eq!(t.password.as_deref(), Some("very-secret-pw"));
    let name = pool_name(&t, full.credentials.as_deref());
    assert_eq!(name, "dir:10.0.0.7:5433/techstart_db#techstart");
    assert!(!name.contains("secret"));
}

#[test]
fn described_target_errors_name_the_problem_not_the_secret() {
    let cfg = config(DIRECTORY).unwrap();
    let d = cfg.directory.as_ref().unwrap();
    let unknown = DirRow {
        credentials: Some("nope".into()),
        ..row("x")
    };
    let err = described_target(d, &unknown, &cfg).unwrap_err();
    assert!(err.contains("\"nope\""), "{err}");
    assert!(!err.contains("secret"), "{err}");
    let bad_host = DirRow {
        host: Some("evil host/x".into()),
        ..row("x")
    };
    assert!(described_target(d, &bad_host, &cfg).is_err());

    let no_template = config(&DIRECTORY.replace("template = \"tmpl\"\n", "")).unwrap();
    let err = described_target(
        no_template.directory.as_ref().unwrap(),
        &row("x"),
        &no_template,
    )
    .unwrap_err();
    assert!(err.contains("directory.template"), "{err}");
}

#[test]
fn freshness_uses_ttl_for_rows_and_negative_ttl_for_absence() {
    let t0 = Instant::now();
    let (ttl, neg) = (Duration::from_secs(30), Duration::from_secs(5));
    let found = Cached {
        entry: Entry::Found(row("a")),
        fetched: t0,
    };
    let absent = Cached {
        entry: Entry::Absent,
        fetched: t0,
    };
    assert!(found.is_fresh(t0 + Duration::from_secs(10), ttl, neg));
    assert!(!found.is_fresh(t0 + Duration::from_secs(30), ttl, neg));
    assert!(!absent.is_fresh(t0 + Duration::from_secs(10), ttl, neg));
    assert!(absent.is_fresh(t0 + Duration::from_secs(4), ttl, neg));
    let max = Duration::from_secs(60);
    assert!(found.within_staleness(t0 + Duration::from_secs(60), max));
    assert!(!found.within_staleness(t0 + Duration::from_secs(61), max));
}

fn lead(
    cache: &Cache,
    tenant: &str,
) -> (
    tokio::sync::watch::Receiver<Option<cache::FlightResult>>,
    u64,
) {
    match cache.flight(tenant) {
        Flight::Lead { rx, epoch, .. } => (rx, epoch),
        Flight::Join(_) => panic!("expected to lead the flight of {tenant}"),
    }
}

#[test]
fn one_flight_per_tenant_until_stored() {
    let cache = Cache::default();
    let (rx, epoch) = lead(&cache, "acme");
    assert!(matches!(cache.flight("acme"), Flight::Join(_)));
    let (_other, _) = lead(&cache, "globex");
    cache.store(
        "acme",
        epoch,
        &Ok(Entry::Found(row("acme_db"))),
        Instant::now(),
        &rx,
    );
    assert_eq!(
        cache.get("acme").unwrap().entry,
        Entry::Found(row("acme_db"))
    );
    // The flight ended: the next lookup after expiry leads again.
    lead(&cache, "acme");
}

#[test]
fn an_answer_that_raced_an_invalidation_is_not_stored() {
    let cache = Cache::default();
    let (rx, epoch) = lead(&cache, "acme");
    cache.invalidate(Some("acme"));
    // A lookup after the NOTIFY does not join the flight that started before it.
    let (rx2, epoch2) = lead(&cache, "acme");
    cache.store(
        "acme",
        epoch,
        &Ok(Entry::Found(row("old_db"))),
        Instant::now(),
        &rx,
    );
    assert!(
        cache.get("acme").is_none(),
        "pre-invalidation answer stored"
    );
    assert!(
        matches!(cache.flight("acme"), Flight::Join(_)),
        "the new flight was ended by the old one"
    );
    cache.store(
        "acme",
        epoch2,
        &Ok(Entry::Found(row("new_db"))),
        Instant::now(),
        &rx2,
    );
    assert_eq!(
        cache.get("acme").unwrap().entry,
        Entry::Found(row("new_db"))
    );
}

#[test]
fn a_flight_is_ended_even_when_another_tenant_was_invalidated() {
    let cache = Cache::default();
    let (rx, epoch) = lead(&cache, "acme");
    cache.invalidate(Some("globex"));
    cache.store("acme", epoch, &Ok(Entry::Absent), Instant::now(), &rx);
    lead(&cache, "acme");
}

#[test]
fn errors_are_not_cached_and_invalidate_all_forgets_everything() {
    let cache = Cache::default();
    let (rx, epoch) = lead(&cache, "acme");
    cache.store(
        "acme",
        epoch,
        &Err(FetchError::Unavailable("down".into())),
        Instant::now(),
        &rx,
    );
    assert!(cache.get("acme").is_none());
    for t in ["a", "b"] {
        let (rx, epoch) = lead(&cache, t);
        cache.store(t, epoch, &Ok(Entry::Absent), Instant::now(), &rx);
    }
    assert_eq!(cache.len(), 2);
    cache.invalidate(None);
    assert_eq!(cache.len(), 0);
}

#[test]
fn quoted_channel_names() {
    assert_eq!(
        listen::quote_ident("pgtenant_directory"),
        "\"pgtenant_directory\""
    );
    assert_eq!(listen::quote_ident("a\"b"), "\"a\"\"b\"");
}

#[test]
fn the_shipped_directory_examples_validate_with_the_example_config() {
    for var in [
        "PGTENANT_SHARED_PASSWORD",
        "PGTENANT_ACME_PASSWORD",
        "PGTENANT_AUDIT_PASSWORD",
        "PGTENANT_CUSTOMER_DB_PASSWORD",
        "PGTENANT_TENANT_DB_PASSWORD",
        "PGTENANT_DIRECTORY_PASSWORD",
        "PGTENANT_OPS_DB_PASSWORD",
    ] {
        std::env::set_var(var, "example-pw");
    }
    let base = include_str!("../../../config/pgtenant.example.toml");
    let examples = [
        (
            include_str!("../../../config/directory-customer-domains.toml"),
            "customer_template",
            "customer_domains",
        ),
        (
            include_str!("../../../config/directory-tenants.toml"),
            "tenant_template",
            "FROM tenants",
        ),
    ];
    for (fragment, template, table) in examples {
        let cfg = Config::parse(&format!("{base}\n{fragment}")).unwrap();
        cfg.validate().unwrap();
        let d = cfg.directory.unwrap();
        assert_eq!(d.template.as_deref(), Some(template));
        assert!(d.query.contains(table), "{}", d.query);
    }
}

#[test]
fn staleness_is_zero_while_healthy_and_counts_from_the_last_contact() {
    let health = listen::Health::new();
    assert_eq!(health.staleness(), Duration::ZERO);
    health.record_query_failure("connection refused");
    assert!(health.staleness() > Duration::ZERO);
    assert_eq!(
        health
            .recent_query_failure(Duration::from_secs(60))
            .as_deref(),
        Some("connection refused")
    );
    assert!(health.recent_query_failure(Duration::ZERO).is_none());
    health.record_ok();
    assert_eq!(health.staleness(), Duration::ZERO);
    assert!(health
        .recent_query_failure(Duration::from_secs(60))
        .is_none());
}
