//! Token rules with an HS256 key: time claims, iss/aud, header policy, shape, claims.

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use super::*;

#[test]
fn valid_token_yields_identity() {
    let v = verifier(&hs_cfg());
    let exp = now() + 300;
    let claims = claims_with(json!({"exp": exp, "jti": "token-1", "role": "reader"}));
    let token = sign(
        &json!({"alg": "HS256", "typ": "JWT", "kid": "key-2024"}),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let id = v.verify(&token).unwrap();
    assert_eq!(id.tenant.as_str(), "acme");
    assert_eq!(id.user, "alice");
    assert_eq!(id.kid.as_deref(), Some("key-2024"));
    assert_eq!(id.jti.as_deref(), Some("token-1"));
    assert_eq!(id.expires_at, exp);
    assert_eq!(id.claims["role"], "reader");
    let debug = format!("{id:?}");
    assert_no_leak(&debug, &token);
}

#[test]
fn bad_signature_is_rejected() {
    let v = verifier(&hs_cfg());
    let other = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
    let token = sign(&json!({"alg": "HS256"}), &good_claims(), &other);
    assert_rejected(&v, &token, "bad_signature", true);

    // A payload swapped under a valid signature (tenant changed after signing).
    let good = hs(&good_claims());
    let forged = hs(&claims_with(json!({"tenant_id": "victim"})));
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = forged.split('.').nth(1).unwrap();
    let spliced = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_rejected(&v, &spliced, "bad_signature", true);

    // Signature stripped.
    assert_rejected(
        &v,
        &format!("{}.{}.", parts[0], parts[1]),
        "bad_signature",
        true,
    );
}

#[test]
fn expiry_respects_leeway() {
    let v = verifier(&hs_cfg());
    let expired = hs(&claims_with(json!({"iat": now() - 600, "exp": now() - 60})));
    let err = assert_rejected(&v, &expired, "expired", true);
    assert_eq!(err.to_string(), "token expired");
    // 10 s past exp is inside the 30 s leeway.
    let recent = hs(&claims_with(json!({"iat": now() - 600, "exp": now() - 10})));
    assert!(v.verify(&recent).is_ok());

    let strict = verifier(&JwtConfig {
        leeway_secs: 0,
        ..hs_cfg()
    });
    assert_rejected(&strict, &recent, "expired", true);
}

#[test]
fn missing_or_malformed_exp_is_rejected() {
    let v = verifier(&hs_cfg());
    let err = assert_rejected(
        &v,
        &hs(&claims_without("exp")),
        "missing_registered_claim",
        true,
    );
    assert_eq!(err.to_string(), "token has no valid \"exp\" claim");
    // jsonwebtoken reports an unreadable `exp` as missing.
    let err = v
        .verify(&hs(&claims_with(json!({"exp": "tomorrow"}))))
        .unwrap_err();
    assert!(err.is_invalid_token(), "{err}");
    let err = v.verify(&hs(&claims_with(json!({"exp": -5})))).unwrap_err();
    assert!(err.is_invalid_token(), "{err}");
}

#[test]
fn nbf_is_validated() {
    let v = verifier(&hs_cfg());
    let future = hs(&claims_with(json!({"nbf": now() + 120})));
    assert_rejected(&v, &future, "not_yet_valid", true);
    let within_leeway = hs(&claims_with(json!({"nbf": now() + 10})));
    assert!(v.verify(&within_leeway).is_ok());
    assert_rejected(
        &v,
        &hs(&claims_with(json!({"nbf": "soon"}))),
        "malformed",
        true,
    );
}

#[test]
fn iat_in_the_future_is_rejected() {
    let v = verifier(&hs_cfg());
    let future = hs(&claims_with(json!({"iat": now() + 120})));
    let err = assert_rejected(&v, &future, "issued_in_future", true);
    assert_eq!(err.to_string(), "token was issued in the future");
    assert!(v
        .verify(&hs(&claims_with(json!({"iat": now() + 10}))))
        .is_ok());
    assert!(v.verify(&hs(&claims_without("iat"))).is_ok());
    assert_rejected(
        &v,
        &hs(&claims_with(json!({"iat": "now"}))),
        "malformed",
        true,
    );
    assert_rejected(&v, &hs(&claims_with(json!({"iat": -1}))), "malformed", true);
}

fn iss_aud_cfg() -> JwtConfig {
    JwtConfig {
        issuer: Some("https://auth.example.com".into()),
        audience: Some("pgtenant".into()),
        ..hs_cfg()
    }
}

#[test]
fn issuer_is_required_and_matched_when_configured() {
    let v = verifier(&iss_aud_cfg());
    let ok = claims_with(json!({"iss": "https://auth.example.com", "aud": "pgtenant"}));
    assert!(v.verify(&hs(&ok)).is_ok());

    let mut wrong = ok.clone();
    wrong["iss"] = json!("https://evil.example.com");
    assert_rejected(&v, &hs(&wrong), "wrong_issuer", true);

    wrong.as_object_mut().unwrap().remove("iss");
    let err = assert_rejected(&v, &hs(&wrong), "missing_registered_claim", true);
    assert_eq!(err.to_string(), "token has no valid \"iss\" claim");
}

#[test]
fn audience_is_required_and_matched_when_configured() {
    let v = verifier(&iss_aud_cfg());
    let ok = claims_with(json!({"iss": "https://auth.example.com", "aud": "pgtenant"}));

    let mut several = ok.clone();
    several["aud"] = json!(["other-service", "pgtenant"]);
    assert!(v.verify(&hs(&several)).is_ok());

    let mut wrong = ok.clone();
    wrong["aud"] = json!("other-service");
    assert_rejected(&v, &hs(&wrong), "wrong_audience", true);
    wrong["aud"] = json!(["a", "b"]);
    assert_rejected(&v, &hs(&wrong), "wrong_audience", true);

    wrong.as_object_mut().unwrap().remove("aud");
    assert_rejected(&v, &hs(&wrong), "missing_registered_claim", true);
}

#[test]
fn unconfigured_iss_is_ignored_but_unconfigured_aud_is_refused() {
    let v = verifier(&hs_cfg());
    assert!(v
        .verify(&hs(&claims_with(json!({"iss": "anyone"}))))
        .is_ok());
    // RFC 7519 §4.1.3: a recipient that is not named in a present `aud` must reject.
    assert_rejected(
        &v,
        &hs(&claims_with(json!({"aud": "someone-else"}))),
        "wrong_audience",
        true,
    );
}

#[test]
fn algorithm_outside_allow_list_is_rejected() {
    let v = verifier(&hs_cfg());
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let token = sign(&json!({"alg": "HS384"}), &good_claims(), &key);
    assert_rejected(&v, &token, "algorithm", true);

    let both = verifier(&JwtConfig {
        algorithms: vec!["HS256".into(), "HS384".into()],
        ..hs_cfg()
    });
    assert!(both.verify(&token).is_ok());
}

#[test]
fn alg_none_is_rejected() {
    let v = verifier(&hs_cfg());
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        let payload = b64(good_claims().to_string().as_bytes());
        let token = format!("{header}.{payload}.");
        assert_rejected(&v, &token, "algorithm", true);
        // Same with some signature bytes attached.
        assert_rejected(&v, &format!("{token}c2lnbmF0dXJl"), "algorithm", true);
    }
}

#[test]
fn unknown_or_non_string_alg_is_rejected() {
    let v = verifier(&hs_cfg());
    let payload = b64(good_claims().to_string().as_bytes());
    let token = format!("{}.{payload}.c2ln", b64(br#"{"alg":"HS1024"}"#));
    assert_rejected(&v, &token, "algorithm", true);
    let token = format!("{}.{payload}.c2ln", b64(br#"{"alg":256}"#));
    assert_rejected(&v, &token, "malformed", true);
    let token = format!("{}.{payload}.c2ln", b64(br#"{"typ":"JWT"}"#));
    assert_rejected(&v, &token, "malformed", true);
}

#[test]
fn crit_header_is_rejected() {
    let v = verifier(&hs_cfg());
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let token = sign(
        &json!({"alg": "HS256", "crit": ["exp"], "exp": 1}),
        &good_claims(),
        &key,
    );
    assert_rejected(&v, &token, "crit_header", true);
    let token = sign(&json!({"alg": "HS256", "crit": []}), &good_claims(), &key);
    assert_rejected(&v, &token, "crit_header", true);
}

#[test]
fn key_url_headers_are_ignored() {
    let v = verifier(&hs_cfg());
    let header = json!({
        "alg": "HS256",
        "jku": "https://evil.example.com/jwks.json",
        "x5u": "https://evil.example.com/cert.pem",
    });
    let good = EncodingKey::from_secret(SECRET.as_bytes());
    assert!(v.verify(&sign(&header, &good_claims(), &good)).is_ok());

    // A token carrying its own key in `jwk`, signed with that key: the embedded key is not used.
    let attacker_secret = b"attacker-secret-attacker-secret-attacker";
    let header = json!({"alg": "HS256", "jwk": {"kty": "oct", "k": b64(attacker_secret)}});
    let token = sign(
        &header,
        &good_claims(),
        &EncodingKey::from_secret(attacker_secret),
    );
    assert_rejected(&v, &token, "bad_signature", true);
}

#[test]
fn kid_must_be_a_bounded_string() {
    let v = verifier(&hs_cfg());
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let long = "k".repeat(crate::auth::MAX_KID_LEN + 1);
    assert_rejected(
        &v,
        &sign(&json!({"alg": "HS256", "kid": long}), &good_claims(), &key),
        "malformed",
        true,
    );
    assert_rejected(
        &v,
        &sign(&json!({"alg": "HS256", "kid": 7}), &good_claims(), &key),
        "malformed",
        true,
    );
    assert_rejected(
        &v,
        &sign(&json!({"alg": "HS256", "kid": ""}), &good_claims(), &key),
        "malformed",
        true,
    );
    let max = "k".repeat(crate::auth::MAX_KID_LEN);
    let id = v
        .verify(&sign(
            &json!({"alg": "HS256", "kid": max}),
            &good_claims(),
            &key,
        ))
        .unwrap();
    assert_eq!(id.kid.map(|k| k.len()), Some(crate::auth::MAX_KID_LEN));
}

#[test]
fn malformed_tokens_are_rejected() {
    let v = verifier(&hs_cfg());
    let good = hs(&good_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let cases = [
        String::new(),
        "not-a-token".to_string(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.{s}"),
        format!("{h}.{p}.{s}.{s}.{s}"),
        format!("!!!.{p}.{s}"),
        format!("{h}=.{p}.{s}"),
        format!("{}.{p}.{s}", b64(b"not json")),
        format!("{}.{p}.{s}", b64(b"[\"alg\",\"HS256\"]")),
        format!("{}.{p}.{s}", b64(br#"{"alg":"HS256","alg":"HS256"}"#)),
        format!(".{p}.{s}"),
        format!("{h}.{p}.!!!"),
        format!("{h}.{p}.{s}="),
        format!(" {good}"),
    ];
    for token in &cases {
        let err = v.verify(token).expect_err(token);
        assert!(err.is_invalid_token(), "{token}: {err}");
        assert!(
            ["malformed", "bad_signature"].contains(&err.reason()),
            "{token}: {err} ({})",
            err.reason()
        );
        assert_no_leak(&err.to_string(), token);
    }
}

#[test]
fn signed_but_malformed_payloads_are_rejected() {
    let v = verifier(&hs_cfg());
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let header = r#"{"alg":"HS256"}"#;
    let exp = now() + 300;
    let payloads = [
        "not json".to_string(),
        "[1,2,3]".to_string(),
        "\"a string\"".to_string(),
        // Two tenant ids: one parser's first is another's last.
        format!(r#"{{"tenant_id":"acme","sub":"a","exp":{exp},"tenant_id":"victim"}}"#),
        format!(r#"{{"tenant_id":"acme","sub":"a","exp":{exp},"app":{{"t":1,"t":2}}}}"#),
    ];
    for payload in &payloads {
        let token = sign_raw(header, payload, &key, Algorithm::HS256);
        assert_rejected(&v, &token, "malformed", true);
    }
    // Valid signature over text that is not base64url.
    let message = format!("{}.%%%%", b64(header.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    assert_rejected(&v, &format!("{message}.{sig}"), "malformed", true);
}

#[test]
fn oversized_token_is_rejected_before_parsing() {
    let v = verifier(&hs_cfg());
    let token = "a".repeat(crate::auth::MAX_TOKEN_LEN + 1);
    let err = assert_rejected(&v, &token, "too_large", true);
    assert_eq!(err.to_string(), "token is too large");
    // A genuine token just under the cap still verifies.
    let filler = "x".repeat(crate::auth::MAX_TOKEN_LEN / 2);
    let token = hs(&claims_with(json!({"filler": filler})));
    assert!(token.len() <= crate::auth::MAX_TOKEN_LEN);
    assert!(v.verify(&token).is_ok());
}

#[test]
fn missing_tenant_is_an_access_error() {
    let v = verifier(&hs_cfg());
    let err = assert_rejected(
        &v,
        &hs(&claims_without("tenant_id")),
        "missing_claim",
        false,
    );
    assert_eq!(err.to_string(), "token is missing claim \"tenant_id\"");
}

#[test]
fn non_string_tenant_is_an_access_error() {
    let v = verifier(&hs_cfg());
    for value in [
        json!(42),
        json!(4.2),
        json!(["acme"]),
        json!({"id": "acme"}),
        json!(true),
        json!(null),
    ] {
        let token = hs(&claims_with(json!({"tenant_id": value})));
        let err = assert_rejected(&v, &token, "invalid_tenant", false);
        assert_eq!(
            err.to_string(),
            "token claim \"tenant_id\" must be a string"
        );
    }
}

#[test]
fn tenant_must_match_the_pattern_and_is_not_echoed() {
    let v = verifier(&hs_cfg());
    let bad = [
        "",
        "-leading-dash",
        "has space",
        "semi;colon",
        "quote'd",
        "../../etc/passwd",
        "tenant\nnewline",
        "ünïcode",
        &"a".repeat(64),
    ];
    for tenant in bad {
        let token = hs(&claims_with(json!({"tenant_id": tenant})));
        let err = assert_rejected(&v, &token, "invalid_tenant", false);
        assert_eq!(
            err.to_string(),
            "tenant id does not match the allowed pattern"
        );
    }
    let ok = hs(&claims_with(json!({"tenant_id": "Acme_1-b"})));
    assert_eq!(v.verify(&ok).unwrap().tenant.as_str(), "Acme_1-b");
}

#[test]
fn tenant_pattern_is_anchored() {
    let v = verifier(&JwtConfig {
        tenant_pattern: "[a-z]+".into(),
        ..hs_cfg()
    });
    assert!(v.verify(&hs(&good_claims())).is_ok());
    for tenant in ["acme; DROP TABLE x", "ACME-acme", "acme\n"] {
        let token = hs(&claims_with(json!({"tenant_id": tenant})));
        assert_rejected(&v, &token, "invalid_tenant", false);
    }
    // Alternation must not escape the anchors.
    let v = verifier(&JwtConfig {
        tenant_pattern: "a|b".into(),
        ..hs_cfg()
    });
    assert_rejected(
        &v,
        &hs(&claims_with(json!({"tenant_id": "xa"}))),
        "invalid_tenant",
        false,
    );
    assert!(v
        .verify(&hs(&claims_with(json!({"tenant_id": "b"}))))
        .is_ok());
}

#[test]
fn nested_tenant_claim() {
    let v = verifier(&JwtConfig {
        tenant_claim: "app.tenant".into(),
        ..hs_cfg()
    });
    let token = hs(&claims_with(
        json!({"app": {"tenant": "acme", "plan": "pro"}}),
    ));
    assert_eq!(v.verify(&token).unwrap().tenant.as_str(), "acme");

    let err = assert_rejected(&v, &hs(&good_claims()), "missing_claim", false);
    assert_eq!(err.to_string(), "token is missing claim \"app.tenant\"");
    let token = hs(&claims_with(json!({"app": {"tenant": {"id": "acme"}}})));
    assert_rejected(&v, &token, "invalid_tenant", false);
    let token = hs(&claims_with(json!({"app": "acme"})));
    assert_rejected(&v, &token, "missing_claim", false);
}

#[test]
fn namespaced_tenant_claim_with_dots_in_its_name() {
    let claim = "https://example.com/tenant";
    let v = verifier(&JwtConfig {
        tenant_claim: claim.into(),
        ..hs_cfg()
    });
    let token = hs(&claims_with(json!({claim: "acme"})));
    assert_eq!(v.verify(&token).unwrap().tenant.as_str(), "acme");
}

#[test]
fn user_claim_rules() {
    let v = verifier(&hs_cfg());
    let err = assert_rejected(&v, &hs(&claims_without("sub")), "missing_claim", false);
    assert_eq!(err.to_string(), "token is missing claim \"sub\"");
    assert_eq!(
        v.verify(&hs(&claims_with(json!({"sub": 42}))))
            .unwrap()
            .user,
        "42"
    );
    assert_eq!(
        v.verify(&hs(&claims_with(json!({"sub": 1.5}))))
            .unwrap()
            .user,
        "1.5"
    );
    for bad in [
        json!(""),
        json!(null),
        json!(true),
        json!("a\u{0}b"),
        json!("u".repeat(257)),
    ] {
        assert_rejected(
            &v,
            &hs(&claims_with(json!({"sub": bad}))),
            "invalid_user",
            false,
        );
    }
    // jsonwebtoken's own pass over registered claims cannot read an array or object `sub`
    // and fails the whole token; refused either way.
    for bad in [json!(["a"]), json!({"a": 1})] {
        let err = v
            .verify(&hs(&claims_with(json!({"sub": bad}))))
            .unwrap_err();
        assert_eq!(err.reason(), "malformed", "{err}");
    }
    let v = verifier(&JwtConfig {
        user_claim: "uid".into(),
        ..hs_cfg()
    });
    for bad in [json!(["a"]), json!({"a": 1})] {
        assert_rejected(
            &v,
            &hs(&claims_with(json!({"uid": bad}))),
            "invalid_user",
            false,
        );
    }

    let v = verifier(&JwtConfig {
        user_claim: "profile.email".into(),
        ..hs_cfg()
    });
    let token = hs(&claims_with(json!({"profile": {"email": "a@example.com"}})));
    assert_eq!(v.verify(&token).unwrap().user, "a@example.com");
    let err = assert_rejected(&v, &hs(&good_claims()), "missing_claim", false);
    assert_eq!(err.to_string(), "token is missing claim \"profile.email\"");
}

#[test]
fn jti_is_kept_only_when_a_short_string() {
    let v = verifier(&hs_cfg());
    assert_eq!(v.verify(&hs(&good_claims())).unwrap().jti, None);
    assert_eq!(
        v.verify(&hs(&claims_with(json!({"jti": 5})))).unwrap().jti,
        None
    );
    let long = "j".repeat(crate::auth::MAX_USER_LEN + 1);
    assert_eq!(
        v.verify(&hs(&claims_with(json!({"jti": long}))))
            .unwrap()
            .jti,
        None
    );
}

#[test]
fn no_error_message_contains_the_token_or_secret() {
    let v = verifier(&iss_aud_cfg());
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let base = claims_with(json!({"iss": "https://auth.example.com", "aud": "pgtenant"}));
    let with = |changes: serde_json::Value| {
        let mut c = base.clone();
        for (k, val) in changes.as_object().unwrap() {
            c[k] = val.clone();
        }
        hs(&c)
    };
    let tokens = vec![
        with(json!({"exp": now() - 1000})),
        with(json!({"nbf": now() + 1000})),
        with(json!({"iat": now() + 1000})),
        with(json!({"iss": "SECRET-ISSUER-VALUE"})),
        with(json!({"aud": "SECRET-AUDIENCE-VALUE"})),
        with(json!({"tenant_id": "SECRET TENANT VALUE"})),
        with(json!({"tenant_id": 123456789})),
        with(json!({"sub": {"SECRET-USER": 1}})),
        sign(&json!({"alg": "HS512"}), &base, &key),
        sign(
            &json!({"alg": "HS256", "crit": ["SECRET-CRIT"]}),
            &base,
            &key,
        ),
        sign(
            &json!({"alg": "HS256"}),
            &base,
            &EncodingKey::from_secret(b"wrong-secret-wrong-secret-wrong-secret"),
        ),
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(base.to_string().as_bytes())
        ),
        sign_raw(
            r#"{"alg":"HS256"}"#,
            r#"{"SECRETKEY":1,"SECRETKEY":2}"#,
            &key,
            Algorithm::HS256,
        ),
        sign_raw(
            r#"{"alg":"HS256"}"#,
            r#"{"exp":"SECRET-EXP"}"#,
            &key,
            Algorithm::HS256,
        ),
        format!("{}.e30.e30", b64(br#"{"alg":"HS256","typ":"SECRET-TYP"#)),
    ];
    for token in &tokens {
        let err = v.verify(token).expect_err(token);
        let text = err.to_string();
        assert_no_leak(&text, token);
        assert!(
            !text.contains("SECRET"),
            "claim or header value echoed: {text}"
        );
        assert!(
            !format!("{err:?}").contains(SECRET),
            "secret in Debug: {err:?}"
        );
    }
}
