//! The command line: `token`, `check-config`.

mod common;

use std::process::Command;

fn pgtenant() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgtenant"))
}

#[test]
fn token_prints_a_verifiable_hs256_token() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("dev.key");
    std::fs::write(&secret_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = pgtenant()
        .args(["token", "--secret-file"])
        .arg(&secret_file)
        .args([
            "--tenant",
            "acme",
            "--sub",
            "alice@acme.com",
            "--ttl",
            "60",
            "--claim",
            "role=auditor",
            "--claim",
            "level=3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["tenant_id"], "acme");
    assert_eq!(data.claims["sub"], "alice@acme.com");
    assert_eq!(data.claims["role"], "auditor");
    assert_eq!(data.claims["level"], 3);
    let exp = data.claims["exp"].as_u64().unwrap();
    let iat = data.claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 60);
}

#[test]
fn check_config_accepts_the_demo_config_and_names_what_is_wrong() {
    let env = common::env();
    let out = pgtenant()
        .arg("check-config")
        .arg("--config")
        .arg(&env.demo.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&env.demo.config_path)
        .unwrap()
        .replace("acme = \"acme\"", "acme = \"nowhere\"");
    std::fs::write(&bad, text).unwrap();
    let out = pgtenant()
        .arg("check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown upstream") && err.contains("nowhere"),
        "{err}"
    );
    // The secret never shows up in the error.
    assert!(!err.contains(&env.demo.jwt_secret));
}

#[test]
fn doctor_passes_the_demo_and_reports_json() {
    let env = common::env();
    let out = pgtenant()
        .arg("doctor")
        .arg("--config")
        .arg(&env.demo.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed on the demo:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("shared"), "{text}");
    let out = pgtenant()
        .arg("doctor")
        .arg("--json")
        .arg("--config")
        .arg(&env.demo.config_path)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["summary"]["fatal"], 0, "{json}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&env.demo.jwt_secret));
}

#[test]
fn serve_refuses_to_start_on_fatal_isolation_findings() {
    let env = common::env();
    let dir = tempfile::tempdir().unwrap();
    // An unreachable shared upstream cannot be checked: a fatal finding.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&env.demo.config_path).unwrap()
        + &format!(
            "\n[upstreams.unreachable]\nkind = \"shared\"\nurl = \"postgres://pgtenant:pw@127.0.0.1:{free}/saas\"\nconnect_timeout = \"1s\"\n"
        );
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = pgtenant()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("PGTENANT_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("isolation checks found fatal problems"),
        "{err}"
    );
    assert!(err.contains("upstream_unchecked"), "{err}");
    assert!(!err.contains(":pw@"), "password leaked: {err}");
}

#[test]
fn audit_sql_prints_the_ddl_and_insert_only_grants() {
    let out = pgtenant()
        .args([
            "audit",
            "sql",
            "--table",
            "compliance.trail",
            "--writer-role",
            "shipper",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql = String::from_utf8(out.stdout).unwrap();
    for part in [
        "BEGIN;",
        "CREATE SCHEMA IF NOT EXISTS \"compliance\";",
        "CREATE TABLE IF NOT EXISTS \"compliance\".\"trail\"",
        "(event_instance, event_seq)",
        "REVOKE ALL ON TABLE \"compliance\".\"trail\" FROM PUBLIC, \"shipper\";",
        "GRANT INSERT ON TABLE \"compliance\".\"trail\" TO \"shipper\";",
        "COMMIT;",
    ] {
        assert!(sql.contains(part), "{part} missing in\n{sql}");
    }
    let bad = pgtenant()
        .args(["audit", "sql", "--table", "a;drop"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// `audit init` with `sink = "tenant"`: the central database and the dedicated upstream's
/// own, each with its writer; passwords never printed.
#[test]
fn audit_init_sets_up_every_audit_database_of_the_config() {
    let pg = pgtenant::embedded_pg::TempPg::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("audit.toml");
    let url = |user: &str, pw: &str, db: &str| pg.tcp_url(user, pw, db);
    std::fs::write(
        &cfg,
        format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n\
             [jwt]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
             [upstreams.acme]\nkind = \"dedicated\"\nurl = \"{}\"\naudit_url = \"{}\"\n\
             [audit]\nurl = \"{}\"\nsink = \"tenant\"\n",
            url("app", "apppw", "acme"),
            url("acme_audit", "acmesecret1", "acme_audit"),
            url("central_audit", "centralsecret2", "audit"),
        ),
    )
    .unwrap();
    let admin = format!(
        "host={} port={} user=postgres dbname=postgres",
        pg.socket_dir.display(),
        pg.port
    );
    for round in 0..2 {
        let out = pgtenant()
            .args(["audit", "init", "--config"])
            .arg(&cfg)
            .env("PGTENANT_ADMIN_URL", &admin)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("[audit] url") && stdout.contains("central_audit"),
            "{stdout}"
        );
        assert!(
            stdout.contains("upstreams.acme.audit_url") && stdout.contains("acme_audit"),
            "{stdout}"
        );
        for secret in ["acmesecret1", "centralsecret2"] {
            assert!(!stdout.contains(secret) && !stderr.contains(secret));
        }
    }
}
