//! `issue_hs256`, the self test, and the error table.

use serde_json::json;

use super::*;
use crate::auth::issue_hs256;

#[test]
fn issued_token_round_trips_through_verify() {
    let v = verifier(&JwtConfig {
        issuer: Some("pgtenant-cli".into()),
        audience: Some("pgtenant".into()),
        ..hs_cfg()
    });
    let extra = vec![
        ("iss".to_string(), json!("pgtenant-cli")),
        ("aud".to_string(), json!("pgtenant")),
        ("jti".to_string(), json!("abc-123")),
        ("admin".to_string(), json!(true)),
        ("level".to_string(), json!(3)),
    ];
    let token = issue_hs256(
        SECRET.as_bytes(),
        "tenant_id",
        "acme",
        Some("alice"),
        600,
        &extra,
    )
    .unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!(id.tenant.as_str(), "acme");
    assert_eq!(id.user, "alice");
    assert_eq!(id.jti.as_deref(), Some("abc-123"));
    assert_eq!(id.claims["admin"], true);
    assert_eq!(id.claims["level"], 3);
    let iat = id.claims["iat"].as_u64().unwrap();
    assert_eq!(id.expires_at, iat + 600);
    assert!(iat.abs_diff(now()) <= 5);
}

#[test]
fn issued_token_with_nested_tenant_claim() {
    let v = verifier(&JwtConfig {
        tenant_claim: "app.org.tenant".into(),
        ..hs_cfg()
    });
    let token = issue_hs256(
        SECRET.as_bytes(),
        "app.org.tenant",
        "acme",
        Some("bob"),
        60,
        &[],
    )
    .unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!(id.tenant.as_str(), "acme");
    assert_eq!(id.claims["app"]["org"]["tenant"], "acme");
}

#[test]
fn issued_token_without_sub_fails_the_user_check() {
    let v = verifier(&hs_cfg());
    let token = issue_hs256(SECRET.as_bytes(), "tenant_id", "acme", None, 60, &[]).unwrap();
    assert_rejected(&v, &token, "missing_claim", false);
}

#[test]
fn issue_refuses_bad_input() {
    let issue =
        |secret: &[u8], claim: &str, tenant: &str, extra: &[(String, serde_json::Value)]| {
            issue_hs256(secret, claim, tenant, Some("u"), 60, extra).unwrap_err()
        };
    let err = issue(b"too-short", "tenant_id", "acme", &[]);
    assert_eq!(err.reason(), "issue");
    assert!(!err.to_string().contains("too-short"));
    issue(SECRET.as_bytes(), "", "acme", &[]);
    issue(SECRET.as_bytes(), "a..b", "acme", &[]);
    issue(SECRET.as_bytes(), "tenant_id", "", &[]);
    for name in ["exp", "iat", "sub", "tenant_id"] {
        let err = issue(
            SECRET.as_bytes(),
            "tenant_id",
            "acme",
            &[(name.to_string(), json!("x"))],
        );
        assert!(err.to_string().contains("collides"), "{err}");
    }
    let err = issue(
        SECRET.as_bytes(),
        "app.tenant",
        "acme",
        &[("app".to_string(), json!({}))],
    );
    assert!(err.to_string().contains("collides"), "{err}");
    let twice = [("k".to_string(), json!(1)), ("k".to_string(), json!(2))];
    assert!(issue(SECRET.as_bytes(), "tenant_id", "acme", &twice)
        .to_string()
        .contains("twice"));
}

#[test]
fn self_test_passes_with_the_compiled_backend() {
    verifier(&hs_cfg()).self_test().unwrap();
}

#[test]
fn error_table() {
    use AuthError::*;
    let token_errors = [
        TooLarge,
        Malformed("x"),
        AlgorithmNotAllowed,
        CritHeader,
        UnknownKid,
        MissingKid,
        BadSignature,
        Expired,
        NotYetValid,
        IssuedInFuture,
        WrongIssuer,
        WrongAudience,
        MissingRegisteredClaim("exp"),
        InvalidRegisteredClaim("iat"),
        VerificationFailed,
    ];
    for e in &token_errors {
        assert!(e.is_invalid_token(), "{e:?} should map to 28P01");
    }
    let access_errors = [
        MissingClaim {
            claim: "tenant_id".into(),
        },
        TenantNotString {
            claim: "tenant_id".into(),
        },
        InvalidTenant,
        InvalidUser {
            claim: "sub".into(),
        },
    ];
    for e in &access_errors {
        assert!(!e.is_invalid_token(), "{e:?} should map to 28000");
    }
    for e in [Config("x".into()), Backend("x"), Issue("x".into())] {
        assert!(!e.is_invalid_token());
    }
    for e in token_errors.iter().chain(&access_errors) {
        let r = e.reason();
        assert!(
            !r.is_empty() && r.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{r}"
        );
    }
    assert_eq!(BadSignature.to_string(), "token signature is invalid");
    assert_eq!(BadSignature.reason(), "bad_signature");
    assert_eq!(Expired.reason(), "expired");
    assert_eq!(NotYetValid.reason(), "not_yet_valid");
    assert_eq!(WrongIssuer.reason(), "wrong_issuer");
    assert_eq!(WrongAudience.reason(), "wrong_audience");
    assert_eq!(UnknownKid.reason(), "unknown_kid");
    assert_eq!(AlgorithmNotAllowed.reason(), "algorithm");
    assert_eq!(InvalidTenant.reason(), "invalid_tenant");
}

#[test]
fn verifier_and_identity_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<JwtVerifier>();
    assert_send_sync::<crate::auth::Identity>();
    assert_send_sync::<AuthError>();
}
