//! The doctor against a real PostgreSQL: the provisioned demo passes, and each
//! misconfiguration from the hardening checklist, built on it and then undone, is found
//! with the right check id.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::*;
use crate::config::Config;
use crate::demo::{self, DemoEnv};
use crate::embedded_pg::TempPg;

struct Fixture {
    pg: TempPg,
    _work: tempfile::TempDir,
    env: DemoEnv,
    cfg: Config,
    /// Superuser on database `saas`.
    admin: Client,
}

async fn fixture() -> Fixture {
    let pg = TempPg::start_async().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let env = demo::provision(&pg, work.path(), "127.0.0.1:0", "127.0.0.1:0")
        .await
        .unwrap();
    let cfg = Config::load(&env.config_path).unwrap();
    let admin = pg.admin_client("saas").await.unwrap();
    Fixture {
        pg,
        _work: work,
        env,
        cfg,
        admin,
    }
}

impl Fixture {
    fn shared(&self) -> &UpstreamConfig {
        &self.cfg.upstreams[demo::data::SHARED_UPSTREAM]
    }

    /// The shared upstream pointed at another database of the cluster.
    fn upstream_on(&self, db: &str) -> UpstreamConfig {
        let mut up = self.shared().clone();
        let pw = &self.env.logins[demo::data::POOL_ROLE];
        up.url = self.pg.tcp_url(demo::data::POOL_ROLE, pw, db);
        up
    }

    /// Superuser over the unix socket, as a libpq key=value string.
    fn admin_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.pg.socket_dir.display(),
            self.pg.port
        )
    }
}

fn ids(findings: &[Finding]) -> Vec<&'static str> {
    findings.iter().map(|f| f.check).collect()
}

/// A misconfiguration: SQL (as superuser on `saas`) that makes it, the checks that must
/// report it, checks that must stay quiet, and SQL that restores the demo.
struct Scenario {
    name: &'static str,
    setup: &'static str,
    expect: &'static [&'static str],
    absent: &'static [&'static str],
    teardown: &'static str,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "pool role superuser",
            setup: "ALTER ROLE pgtenant SUPERUSER",
            expect: &["pool_role_superuser"],
            absent: &["rls_probe_rows_visible"],
            teardown: "ALTER ROLE pgtenant NOSUPERUSER",
        },
        Scenario {
            name: "pool role BYPASSRLS",
            setup: "ALTER ROLE pgtenant BYPASSRLS",
            expect: &["pool_role_bypassrls"],
            absent: &[],
            teardown: "ALTER ROLE pgtenant NOBYPASSRLS",
        },
        Scenario {
            name: "pool role CREATEROLE and CREATEDB",
            setup: "ALTER ROLE pgtenant CREATEROLE CREATEDB",
            expect: &["pool_role_createrole", "pool_role_createdb"],
            absent: &[],
            teardown: "ALTER ROLE pgtenant NOCREATEROLE NOCREATEDB",
        },
        Scenario {
            name: "pool role member of the table owner",
            setup: "GRANT saas_owner TO pgtenant",
            // saas_owner owns the database, so it also reaches pg_database_owner.
            expect: &[
                "pool_role_member",
                "pool_role_owns_tenant_table",
                "pool_role_set_role",
            ],
            absent: &[],
            teardown: "REVOKE saas_owner FROM pgtenant",
        },
        Scenario {
            name: "pool role reaches a role through a nested membership",
            setup: "CREATE ROLE doctor_mid NOLOGIN; GRANT saas_owner TO doctor_mid; \
                    GRANT doctor_mid TO pgtenant",
            expect: &["pool_role_member", "pool_role_set_role"],
            absent: &[],
            teardown: "DROP ROLE doctor_mid",
        },
        Scenario {
            name: "pool role owns a tenant table",
            setup: "ALTER TABLE customers OWNER TO pgtenant",
            expect: &["pool_role_owns_tenant_table"],
            absent: &[],
            // The new owner's grants merge into ownership and leave with it.
            teardown: "ALTER TABLE customers OWNER TO saas_owner; \
                       GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO pgtenant; \
                       GRANT USAGE ON SEQUENCE customers_id_seq TO pgtenant",
        },
        Scenario {
            name: "CREATE on schema public",
            setup: "GRANT CREATE ON SCHEMA public TO pgtenant",
            expect: &["pool_role_schema_create"],
            absent: &[],
            teardown: "REVOKE CREATE ON SCHEMA public FROM pgtenant",
        },
        Scenario {
            name: "CREATE and TEMP on the database",
            setup: "GRANT CREATE, TEMPORARY ON DATABASE saas TO pgtenant",
            expect: &["pool_role_database_create", "pool_role_temp"],
            absent: &[],
            teardown: "REVOKE CREATE, TEMPORARY ON DATABASE saas FROM pgtenant",
        },
        Scenario {
            name: "ALTER ROLE pgtenant SET search_path",
            setup: "ALTER ROLE pgtenant SET search_path = public, pg_temp",
            expect: &["pool_role_settings"],
            absent: &[],
            teardown: "ALTER ROLE pgtenant RESET ALL",
        },
        Scenario {
            name: "database-wide default of the tenant setting",
            setup: "ALTER DATABASE saas SET app.current_tenant_id = 'medcorp'",
            expect: &["tenant_setting_default"],
            absent: &[],
            teardown: "ALTER DATABASE saas RESET app.current_tenant_id",
        },
        Scenario {
            name: "table without RLS",
            setup: "ALTER TABLE customers DISABLE ROW LEVEL SECURITY",
            expect: &["table_rls_disabled"],
            absent: &["rls_probe_rows_visible"],
            teardown: "ALTER TABLE customers ENABLE ROW LEVEL SECURITY",
        },
        Scenario {
            name: "RLS enabled but not forced",
            setup: "ALTER TABLE invoices NO FORCE ROW LEVEL SECURITY",
            expect: &["table_rls_not_forced"],
            absent: &[],
            teardown: "ALTER TABLE invoices FORCE ROW LEVEL SECURITY",
        },
        Scenario {
            name: "no policy",
            setup: "DROP POLICY tenant_isolation ON customers",
            expect: &["table_no_policy"],
            absent: &["table_no_tenant_policy"],
            teardown: "CREATE POLICY tenant_isolation ON customers \
                       USING (tenant_id = current_setting('app.current_tenant_id', true)) \
                       WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true))",
        },
        Scenario {
            name: "an extra permissive policy USING (true)",
            setup: "CREATE POLICY open ON customers FOR SELECT USING (true)",
            expect: &["policy_not_tenant_scoped"],
            absent: &["table_no_tenant_policy"],
            teardown: "DROP POLICY open ON customers",
        },
        Scenario {
            name: "the only policy rewritten to USING (true)",
            setup: "ALTER POLICY tenant_isolation ON invoices USING (true) WITH CHECK (true)",
            expect: &["policy_not_tenant_scoped", "table_no_tenant_policy"],
            absent: &[],
            teardown: "ALTER POLICY tenant_isolation ON invoices \
                       USING (tenant_id = current_setting('app.current_tenant_id', true)) \
                       WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true))",
        },
        Scenario {
            name: "a policy on another role does not count",
            setup: "CREATE POLICY admin_all ON customers TO saas_owner USING (true)",
            expect: &[],
            absent: &["policy_not_tenant_scoped"],
            teardown: "DROP POLICY admin_all ON customers",
        },
        Scenario {
            name: "a policy with an OR branch the text check accepts, caught by the probe",
            setup: "ALTER POLICY tenant_isolation ON customers \
                    USING (tenant_id = current_setting('app.current_tenant_id', true) \
                           OR current_setting('app.current_tenant_id', true) IS NULL)",
            expect: &["policy_expression_or", "rls_probe_rows_visible"],
            absent: &["policy_not_tenant_scoped"],
            teardown: "ALTER POLICY tenant_isolation ON customers \
                       USING (tenant_id = current_setting('app.current_tenant_id', true))",
        },
        Scenario {
            name: "policies for SELECT only",
            setup: "DROP POLICY tenant_isolation ON invoices; \
                    CREATE POLICY tenant_read ON invoices FOR SELECT \
                        USING (tenant_id = current_setting('app.current_tenant_id', true))",
            expect: &["policy_commands_partial"],
            absent: &["table_no_tenant_policy"],
            teardown: "DROP POLICY tenant_read ON invoices; \
                       CREATE POLICY tenant_isolation ON invoices \
                       USING (tenant_id = current_setting('app.current_tenant_id', true)) \
                       WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true))",
        },
        Scenario {
            name: "tenant column without CHECK (<> '') and nullable",
            setup: "ALTER TABLE customers DROP CONSTRAINT customers_tenant_id_check; \
                    ALTER TABLE customers ALTER COLUMN tenant_id DROP NOT NULL",
            expect: &["tenant_column_allows_empty", "tenant_column_nullable"],
            absent: &[],
            teardown: "ALTER TABLE customers ADD CONSTRAINT customers_tenant_id_check \
                           CHECK (tenant_id <> ''); \
                       ALTER TABLE customers ALTER COLUMN tenant_id SET NOT NULL",
        },
        Scenario {
            name: "rows with tenant '' are seen after RESET",
            setup: "ALTER TABLE customers DROP CONSTRAINT customers_tenant_id_check; \
                    INSERT INTO customers (tenant_id, name, email) VALUES ('', 'ghost', 'ghost@x')",
            expect: &["tenant_column_allows_empty", "rls_probe_rows_visible"],
            absent: &[],
            teardown: "DELETE FROM customers WHERE tenant_id = ''; \
                       ALTER TABLE customers ADD CONSTRAINT customers_tenant_id_check \
                           CHECK (tenant_id <> '')",
        },
        Scenario {
            name: "TRUNCATE granted",
            setup: "GRANT TRUNCATE ON invoices TO pgtenant",
            expect: &["table_truncate_granted"],
            absent: &[],
            teardown: "REVOKE TRUNCATE ON invoices FROM pgtenant",
        },
        Scenario {
            name: "a view over customers without security_invoker",
            setup: "CREATE VIEW customer_names AS SELECT tenant_id, name FROM customers; \
                    CREATE VIEW customer_names_2 WITH (security_invoker = on) AS \
                        SELECT * FROM customer_names; \
                    GRANT SELECT ON customer_names, customer_names_2 TO pgtenant",
            expect: &["view_not_security_invoker"],
            absent: &[],
            teardown: "DROP VIEW customer_names_2, customer_names",
        },
        Scenario {
            name: "a security_invoker view is fine",
            setup: "CREATE VIEW customer_names WITH (security_invoker = true) AS \
                        SELECT tenant_id, name FROM customers; \
                    GRANT SELECT ON customer_names TO pgtenant",
            expect: &[],
            absent: &["view_not_security_invoker"],
            teardown: "DROP VIEW customer_names",
        },
        Scenario {
            name: "a materialized view over invoices",
            setup: "CREATE MATERIALIZED VIEW invoice_totals AS \
                        SELECT tenant_id, sum(amount_cents) AS total FROM invoices GROUP BY 1; \
                    GRANT SELECT ON invoice_totals TO pgtenant",
            expect: &["matview_over_tenant_table"],
            absent: &[],
            teardown: "DROP MATERIALIZED VIEW invoice_totals",
        },
        Scenario {
            name: "a SECURITY DEFINER function of the table owner",
            setup: "SET ROLE saas_owner; \
                    CREATE FUNCTION customer_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER \
                        AS $$ SELECT count(*) FROM public.customers $$; \
                    RESET ROLE",
            expect: &["security_definer_function"],
            absent: &[],
            teardown: "DROP FUNCTION customer_count()",
        },
        Scenario {
            name: "a policy function owned by the pool role",
            setup: "ALTER FUNCTION current_tenant_id() OWNER TO pgtenant; \
                    ALTER POLICY tenant_isolation ON customers \
                        USING (tenant_id = public.current_tenant_id())",
            expect: &["pool_role_owns_policy_function"],
            absent: &["policy_not_tenant_scoped"],
            teardown: "ALTER FUNCTION current_tenant_id() OWNER TO saas_owner; \
                       ALTER POLICY tenant_isolation ON customers \
                           USING (tenant_id = current_setting('app.current_tenant_id', true))",
        },
        Scenario {
            name: "a writable table without the tenant column",
            setup: "CREATE TABLE settings (k text PRIMARY KEY, v text); \
                    GRANT SELECT, INSERT, UPDATE ON settings TO pgtenant",
            expect: &["table_without_tenant_column"],
            absent: &[],
            teardown: "DROP TABLE settings",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_passes_and_each_misconfiguration_is_found() {
    let fx = fixture().await;
    let opts = DoctorOptions::default();
    let shared = fx.shared().clone();

    let baseline = check_upstream("shared", &shared, &opts).await.unwrap();
    assert!(
        !has_fatal(&baseline),
        "the demo must pass the doctor:\n{}",
        render_text(&baseline)
    );
    assert_eq!(baseline[0].check, "inspected");
    assert!(
        baseline[0].message.contains("2 tenant table(s)"),
        "{}",
        baseline[0].message
    );
    // Every id emitted is in the catalog, with the catalog's severity.
    for f in &baseline {
        assert_eq!(by_id(f.check).map(|c| c.severity), Some(f.severity));
    }

    let mut failures = Vec::new();
    for s in scenarios() {
        fx.admin
            .batch_execute(s.setup)
            .await
            .unwrap_or_else(|e| panic!("setup of {:?}: {e}", s.name));
        let found = check_upstream("shared", &shared, &opts).await;
        fx.admin
            .batch_execute(s.teardown)
            .await
            .unwrap_or_else(|e| panic!("teardown of {:?}: {e}", s.name));
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                failures.push(format!("{}: doctor failed: {e}", s.name));
                continue;
            }
        };
        let got = ids(&found);
        for id in s.expect {
            let check = by_id(id).unwrap_or_else(|| panic!("{id} is not in CHECKS"));
            let hit = found
                .iter()
                .any(|f| f.check == *id && f.severity == check.severity);
            if !hit {
                failures.push(format!("{}: expected {id}, got {got:?}", s.name));
            }
        }
        for id in s.absent {
            if got.contains(id) {
                failures.push(format!("{}: did not expect {id}, got {got:?}", s.name));
            }
        }
        let after = check_upstream("shared", &shared, &opts).await.unwrap();
        assert_eq!(
            (ids(&after), &after[0].message),
            (ids(&baseline), &baseline[0].message),
            "teardown of {:?} did not restore the demo",
            s.name
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A minimal stand-in for the signed context (no HMAC: the doctor checks the shape and the
/// privileges, not the cryptography), in database `signed_db`.
const SIGNED_SETUP: &str = "
    SET ROLE ctx_owner;
    CREATE SCHEMA pgtenant;
    CREATE TABLE pgtenant.keys (id int PRIMARY KEY, secret bytea NOT NULL);
    CREATE UNLOGGED TABLE pgtenant.context (pid int PRIMARY KEY, tenant text NOT NULL);
    CREATE FUNCTION pgtenant.enter(tenant text) RETURNS void LANGUAGE sql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$ INSERT INTO pgtenant.context VALUES (pg_backend_pid(), tenant)
              ON CONFLICT (pid) DO UPDATE SET tenant = EXCLUDED.tenant $$;
    CREATE FUNCTION pgtenant.current_tenant() RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$ SELECT tenant FROM pgtenant.context WHERE pid = pg_backend_pid() $$;
    CREATE FUNCTION pgtenant.leave() RETURNS void LANGUAGE sql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$ DELETE FROM pgtenant.context WHERE pid = pg_backend_pid() $$;
    REVOKE ALL ON FUNCTION pgtenant.enter(text), pgtenant.current_tenant(), pgtenant.leave() FROM PUBLIC;
    GRANT USAGE ON SCHEMA pgtenant TO pgtenant, saas_owner;
    GRANT EXECUTE ON FUNCTION pgtenant.enter(text), pgtenant.current_tenant(), pgtenant.leave()
        TO pgtenant, saas_owner;
    SET ROLE saas_owner;
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    CREATE TABLE notes (
        id serial PRIMARY KEY,
        tenant_id text NOT NULL CHECK (tenant_id <> ''),
        body text NOT NULL
    );
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    ALTER TABLE notes FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON notes
        USING (tenant_id = (SELECT pgtenant.current_tenant()))
        WITH CHECK (tenant_id = (SELECT pgtenant.current_tenant()));
    GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO pgtenant;
    GRANT USAGE ON SEQUENCE notes_id_seq TO pgtenant;
    RESET ROLE;
    INSERT INTO notes (tenant_id, body) VALUES ('medcorp', 'a'), ('globex', 'b');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mode_checks_the_context_schema() {
    let fx = fixture().await;
    fx.admin
        .batch_execute("CREATE ROLE ctx_owner NOLOGIN; GRANT pg_read_all_stats TO ctx_owner;")
        .await
        .unwrap();
    // CREATE DATABASE cannot share a query string with other statements.
    fx.admin
        .batch_execute("CREATE DATABASE signed_db OWNER saas_owner")
        .await
        .unwrap();
    fx.admin
        .batch_execute(
            "REVOKE ALL ON DATABASE signed_db FROM PUBLIC;
             GRANT CONNECT ON DATABASE signed_db TO pgtenant;",
        )
        .await
        .unwrap();
    let db = fx.pg.admin_client("signed_db").await.unwrap();
    db.batch_execute("GRANT CREATE ON DATABASE signed_db TO ctx_owner")
        .await
        .unwrap();
    db.batch_execute(SIGNED_SETUP).await.unwrap();
    db.batch_execute("REVOKE CREATE ON DATABASE signed_db FROM ctx_owner")
        .await
        .unwrap();

    let signed = DoctorOptions {
        signed_schema: Some("pgtenant".into()),
        admin_url: Some(fx.admin_url()),
        ..DoctorOptions::default()
    };
    let upstream = fx.upstream_on("signed_db");
    let baseline = check_upstream("signed", &upstream, &signed).await.unwrap();
    assert!(!has_fatal(&baseline), "{}", render_text(&baseline));

    // The demo's policies read the plain setting: not a signed-mode deployment.
    let demo = check_upstream("shared", fx.shared(), &signed)
        .await
        .unwrap();
    assert!(
        demo.iter()
            .any(|f| f.check == "policy_not_tenant_scoped" && f.message.contains("plain setting")),
        "{}",
        render_text(&demo)
    );
    assert!(ids(&demo).contains(&"signed_schema_missing"));

    let cases: [(&str, &str, &str); 5] = [
        (
            "GRANT SELECT ON pgtenant.keys TO pgtenant",
            "REVOKE SELECT ON pgtenant.keys FROM pgtenant",
            "signed_keys_readable",
        ),
        (
            "GRANT INSERT ON pgtenant.context TO pgtenant",
            "REVOKE INSERT ON pgtenant.context FROM pgtenant",
            "signed_table_accessible",
        ),
        (
            "REVOKE SELECT ON pgtenant.keys FROM ctx_owner",
            "GRANT SELECT ON pgtenant.keys TO ctx_owner",
            "signed_owner_cannot_read_keys",
        ),
        (
            "REVOKE pg_read_all_stats FROM ctx_owner",
            "GRANT pg_read_all_stats TO ctx_owner",
            "signed_owner_lacks_read_all_stats",
        ),
        (
            "ALTER FUNCTION pgtenant.leave() RENAME TO leave_old",
            "ALTER FUNCTION pgtenant.leave_old() RENAME TO leave",
            "signed_function_missing",
        ),
    ];
    for (setup, teardown, id) in cases {
        db.batch_execute(setup).await.unwrap();
        let found = check_upstream("signed", &upstream, &signed).await.unwrap();
        db.batch_execute(teardown).await.unwrap();
        assert!(
            found
                .iter()
                .any(|f| f.check == id && f.severity == Severity::Fatal),
            "{setup}: expected {id}:\n{}",
            render_text(&found)
        );
    }
    // Without the admin connection the owner checks still run (as the pool role).
    db.batch_execute("REVOKE SELECT ON pgtenant.keys FROM ctx_owner")
        .await
        .unwrap();
    let no_admin = DoctorOptions {
        admin_url: None,
        ..signed.clone()
    };
    let found = check_upstream("signed", &upstream, &no_admin)
        .await
        .unwrap();
    assert!(ids(&found).contains(&"signed_owner_cannot_read_keys"));
    db.batch_execute("GRANT SELECT ON pgtenant.keys TO ctx_owner")
        .await
        .unwrap();

    let missing = DoctorOptions {
        signed_schema: Some("nope".into()),
        ..signed
    };
    let found = check_upstream("signed", &upstream, &missing).await.unwrap();
    assert!(ids(&found).contains(&"signed_schema_missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_covers_shared_upstreams_and_reports_unreachable_ones() {
    let fx = fixture().await;
    let mut cfg = fx.cfg.clone();
    let opts = DoctorOptions::default();

    let found = check_config(&cfg, &opts).await.unwrap();
    let upstreams: Vec<&str> = found.iter().map(|f| f.upstream.as_str()).collect();
    assert!(upstreams.iter().all(|u| *u == "shared"), "{upstreams:?}");
    assert!(!has_fatal(&found), "{}", render_text(&found));

    let mut down = fx.shared().clone();
    down.url = "postgres://pgtenant:pw@127.0.0.1:1/saas".into();
    cfg.upstreams.insert("down".into(), down);
    let found = check_config(&cfg, &opts).await.unwrap();
    assert!(found
        .iter()
        .any(|f| f.upstream == "down" && f.check == "upstream_unchecked"));
    assert!(found.iter().any(|f| f.upstream == "shared"));
    assert!(has_fatal(&found));
    // The URL's password never reaches a finding.
    assert!(!render_json(&found).contains(":pw@"));

    // Dedicated upstreams are not the doctor's business.
    let dedicated = &fx.cfg.upstreams["acme"];
    assert!(matches!(
        check_upstream("acme", dedicated, &opts).await,
        Err(DoctorError::NotShared(_))
    ));
}

fn sample() -> Vec<Finding> {
    let finding = |upstream: &str, check: &Check, object: Option<&str>| Finding {
        upstream: upstream.to_owned(),
        check: check.id,
        severity: check.severity,
        object: object.map(str::to_owned),
        message: format!("{} message", check.id),
        fix: Some("ALTER ROLE pgtenant NOSUPERUSER;".to_owned()),
    };
    vec![
        finding("a", &catalog::INSPECTED, Some("saas")),
        finding(
            "a",
            &catalog::TENANT_COLUMN_NULLABLE,
            Some("public.t.tenant_id"),
        ),
        finding("a", &catalog::POOL_ROLE_SUPERUSER, Some("pgtenant")),
        finding("b", &catalog::INSPECTED, Some("other")),
    ]
}

#[test]
fn text_report_groups_by_upstream_worst_first_with_a_summary() {
    let text = render_text(&sample());
    let a = text.find("upstream a").unwrap();
    let b = text.find("upstream b").unwrap();
    assert!(a < b);
    let fatal = text.find("FATAL   pool_role_superuser [pgtenant]").unwrap();
    let warning = text.find("WARNING tenant_column_nullable").unwrap();
    assert!(text.find("info    inspected [saas]").unwrap() < fatal);
    assert!(fatal < warning && warning < b);
    assert!(text.contains("fix: ALTER ROLE pgtenant NOSUPERUSER;"));
    let summary = text.lines().last().unwrap();
    assert!(
        summary.starts_with("summary: 2 upstream(s), 1 fatal, 1 warning(s), 2 info; FAIL"),
        "{summary}"
    );
    assert!(render_text(&[]).contains("OK: no fatal findings"));
}

#[test]
fn json_report_is_valid_and_carries_the_ids() {
    let findings = sample();
    let json: serde_json::Value = serde_json::from_str(&render_json(&findings)).unwrap();
    assert_eq!(json["summary"]["fatal"], 1);
    assert_eq!(json["summary"]["warning"], 1);
    assert_eq!(json["summary"]["upstreams"], 2);
    assert_eq!(json["summary"]["ok"], false);
    let list = json["findings"].as_array().unwrap();
    assert_eq!(list.len(), 4);
    assert_eq!(list[2]["check"], "pool_role_superuser");
    assert_eq!(list[2]["severity"], "fatal");
    assert_eq!(list[1]["severity"], "warning");
    assert_eq!(list[0]["object"], "saas");
    assert!(has_fatal(&findings));
    assert!(!has_fatal(&findings[..2]));
}

#[test]
fn check_ids_are_unique_snake_case() {
    let mut seen = BTreeMap::new();
    for c in CHECKS {
        assert!(
            c.id.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
            "{}",
            c.id
        );
        assert!(
            seen.insert(c.id, c.severity).is_none(),
            "duplicate {}",
            c.id
        );
    }
    assert_eq!(seen["pool_role_createdb"], Severity::Warning);
    assert_eq!(seen["pool_role_createrole"], Severity::Fatal);
}

#[test]
fn options_debug_redacts_the_admin_url() {
    let opts = DoctorOptions {
        admin_url: Some("postgres://postgres:hunter2@db/x".into()),
        ..DoctorOptions::default()
    };
    assert!(!format!("{opts:?}").contains("hunter2"));
}
