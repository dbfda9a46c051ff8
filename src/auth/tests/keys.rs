//! Key sources: HMAC secrets and secret files, PEM public keys (EC, Ed25519, RSA) and JWKS,
//! with the algorithm-to-key binding and the config errors they raise.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::signature::KeyPair as _;
use jsonwebtoken::EncodingKey;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
use serde_json::json;

use super::*;

/// An rcgen key pair as (signing key for jsonwebtoken, public key PEM file).
pub(super) fn ec_pair(
    alg: &'static rcgen::SignatureAlgorithm,
) -> (KeyPair, EncodingKey, tempfile::NamedTempFile) {
    let kp = KeyPair::generate_for(alg).unwrap();
    let enc = if alg == &PKCS_ED25519 {
        EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap()
    } else {
        EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap()
    };
    let file = temp_file(kp.public_key_pem().as_bytes());
    (kp, enc, file)
}

/// A 2048-bit RSA pair from aws-lc-rs (rcgen's ring backend cannot generate RSA).
pub(super) struct RsaPair {
    pub(super) kp: aws_lc_rs::rsa::KeyPair,
    pub(super) enc: EncodingKey,
}

pub(super) fn rsa_pair() -> RsaPair {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8: Pkcs8V1Der = kp.as_der().unwrap();
    let enc = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    RsaPair { kp, enc }
}

fn config_error(cfg: &JwtConfig) -> String {
    let err = JwtVerifier::from_config(cfg).expect_err("config should be refused");
    assert_eq!(err.reason(), "config", "{err}");
    assert!(!err.is_invalid_token());
    let text = err.to_string();
    assert!(!text.contains(SECRET), "secret leaked: {text}");
    text
}

#[test]
fn short_secret_is_refused_at_config_load() {
    let short = "short-secret-31-bytes-long-xxxx";
    assert_eq!(short.len(), 31);
    let err = config_error(&JwtConfig {
        secret: Some(short.into()),
        ..hs_cfg()
    });
    assert!(err.contains("shorter than 32 bytes"), "{err}");
    assert!(!err.contains(short), "secret echoed: {err}");
    // Exactly 32 bytes is enough.
    assert!(JwtVerifier::from_config(&JwtConfig {
        secret: Some("s".repeat(32)),
        ..hs_cfg()
    })
    .is_ok());
}

#[test]
fn secret_file_strips_exactly_one_newline() {
    let file = temp_file(format!("{SECRET}\n").as_bytes());
    let cfg = JwtConfig {
        secret: None,
        secret_file: Some(file.path().into()),
        ..hs_cfg()
    };
    assert!(verifier(&cfg).verify(&hs(&good_claims())).is_ok());

    let crlf = temp_file(format!("{SECRET}\r\n").as_bytes());
    let cfg = JwtConfig {
        secret: None,
        secret_file: Some(crlf.path().into()),
        ..hs_cfg()
    };
    assert!(verifier(&cfg).verify(&hs(&good_claims())).is_ok());

    let two = temp_file(format!("{SECRET}\n\n").as_bytes());
    let cfg = JwtConfig {
        secret: None,
        secret_file: Some(two.path().into()),
        ..hs_cfg()
    };
    assert_rejected(&verifier(&cfg), &hs(&good_claims()), "bad_signature", true);

    let short = temp_file(b"tiny\n");
    let cfg = JwtConfig {
        secret: None,
        secret_file: Some(short.path().into()),
        ..hs_cfg()
    };
    assert!(config_error(&cfg).contains("shorter than 32 bytes"));

    let cfg = JwtConfig {
        secret: None,
        secret_file: Some("/nonexistent/pgtenant-secret".into()),
        ..hs_cfg()
    };
    assert!(config_error(&cfg).contains("/nonexistent/pgtenant-secret"));
}

#[test]
fn algorithm_list_is_checked() {
    let with = |algs: &[&str]| JwtConfig {
        algorithms: algs.iter().map(|a| a.to_string()).collect(),
        ..hs_cfg()
    };
    assert!(config_error(&with(&[])).contains("empty"));
    assert!(config_error(&with(&["none"])).contains("never allowed"));
    assert!(config_error(&with(&["HS256", "NONE"])).contains("never allowed"));
    assert!(config_error(&with(&["HS257"])).contains("unknown algorithm"));
    // An HMAC secret cannot serve RS256: a mixed list is the key-confusion setup.
    assert!(config_error(&with(&["HS256", "RS256"])).contains("RS256"));
    assert!(JwtVerifier::from_config(&with(&["HS256", "HS384", "HS512"])).is_ok());
}

#[test]
fn exactly_one_key_source_is_required() {
    let file = temp_file(SECRET.as_bytes());
    config_error(&JwtConfig {
        secret_file: Some(file.path().into()),
        ..hs_cfg()
    });
    config_error(&JwtConfig {
        secret: None,
        ..hs_cfg()
    });
}

#[test]
fn other_config_fields_are_checked() {
    assert!(config_error(&JwtConfig {
        tenant_pattern: "([a-z".into(),
        ..hs_cfg()
    })
    .contains("tenant_pattern"));
    assert!(config_error(&JwtConfig {
        tenant_claim: "app..tenant".into(),
        ..hs_cfg()
    })
    .contains("tenant_claim"));
    assert!(config_error(&JwtConfig {
        user_claim: String::new(),
        ..hs_cfg()
    })
    .contains("user_claim"));
    assert!(config_error(&JwtConfig {
        leeway_secs: 301,
        ..hs_cfg()
    })
    .contains("leeway"));
    assert!(config_error(&JwtConfig {
        issuer: Some(String::new()),
        ..hs_cfg()
    })
    .contains("issuer"));
}

#[test]
fn es256_with_pem_public_key() {
    let (_kp, enc, file) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let v = verifier(&file_cfg(&["ES256"], Some(file.path()), None));
    let token = sign(&json!({"alg": "ES256", "typ": "JWT"}), &good_claims(), &enc);
    let id = v.verify(&token).unwrap();
    assert_eq!(id.tenant.as_str(), "acme");
    v.self_test().unwrap();

    // Another P-256 key: bad signature.
    let (_, other, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let forged = sign(&json!({"alg": "ES256"}), &good_claims(), &other);
    assert_rejected(&v, &forged, "bad_signature", true);

    // Key confusion: HS256 "signed" with the public key PEM as the HMAC secret.
    let pem_bytes = std::fs::read(file.path()).unwrap();
    let confused = sign(
        &json!({"alg": "HS256"}),
        &good_claims(),
        &EncodingKey::from_secret(&pem_bytes),
    );
    assert_rejected(&v, &confused, "algorithm", true);
    // ES384 is not allowed (and would not fit a P-256 key either).
    let (_, p384, _) = ec_pair(&PKCS_ECDSA_P384_SHA384);
    assert_rejected(
        &v,
        &sign(&json!({"alg": "ES384"}), &good_claims(), &p384),
        "algorithm",
        true,
    );
}

#[test]
fn ec_curve_binds_the_algorithm() {
    let (_kp, enc, file) = ec_pair(&PKCS_ECDSA_P384_SHA384);
    let v = verifier(&file_cfg(&["ES384"], Some(file.path()), None));
    assert!(v
        .verify(&sign(&json!({"alg": "ES384"}), &good_claims(), &enc))
        .is_ok());
    // A P-384 key with ES256 allowed: ES256 needs P-256.
    assert!(config_error(&file_cfg(&["ES256"], Some(file.path()), None)).contains("ES256"));
    // An EC key with an HMAC algorithm allowed.
    assert!(
        config_error(&file_cfg(&["ES384", "HS256"], Some(file.path()), None)).contains("HS256")
    );
}

#[test]
fn eddsa_with_pem_public_key() {
    let (_kp, enc, file) = ec_pair(&PKCS_ED25519);
    let v = verifier(&file_cfg(&["EdDSA"], Some(file.path()), None));
    assert!(v
        .verify(&sign(&json!({"alg": "EdDSA"}), &good_claims(), &enc))
        .is_ok());
    let (_, other, _) = ec_pair(&PKCS_ED25519);
    assert_rejected(
        &v,
        &sign(&json!({"alg": "EdDSA"}), &good_claims(), &other),
        "bad_signature",
        true,
    );
    v.self_test().unwrap();
}

#[test]
fn rs256_and_ps256_with_pem_public_key() {
    let rsa = rsa_pair();
    let spki: PublicKeyX509Der = rsa.kp.public_key().as_der().unwrap();
    let spki_file = temp_file(pem("PUBLIC KEY", spki.as_ref()).as_bytes());
    // PKCS#1 "RSA PUBLIC KEY" works too.
    let pkcs1_file = temp_file(pem("RSA PUBLIC KEY", rsa.kp.public_key().as_ref()).as_bytes());
    for file in [&spki_file, &pkcs1_file] {
        let v = verifier(&file_cfg(&["RS256", "PS256"], Some(file.path()), None));
        assert!(v
            .verify(&sign(&json!({"alg": "RS256"}), &good_claims(), &rsa.enc))
            .is_ok());
        assert!(v
            .verify(&sign(&json!({"alg": "PS256"}), &good_claims(), &rsa.enc))
            .is_ok());
        assert_rejected(
            &v,
            &sign(&json!({"alg": "RS512"}), &good_claims(), &rsa.enc),
            "algorithm",
            true,
        );
        let confused = std::fs::read(file.path()).unwrap();
        let token = sign(
            &json!({"alg": "HS256"}),
            &good_claims(),
            &EncodingKey::from_secret(&confused),
        );
        assert_rejected(&v, &token, "algorithm", true);
        v.self_test().unwrap();
    }
    assert!(
        config_error(&file_cfg(&["RS256", "HS256"], Some(spki_file.path()), None))
            .contains("HS256")
    );
}

/// DER of a PKCS#1 RSAPublicKey with a `bits`-bit modulus (not a real key: only its size
/// matters, which is checked before any crypto).
fn fake_rsa_pkcs1(bits: usize) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match body.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(body);
        out
    }
    let mut modulus = vec![0x00];
    modulus.extend(std::iter::repeat_n(0xC5u8, bits / 8));
    let mut body = tlv(0x02, &modulus);
    body.extend(tlv(0x02, &[0x01, 0x00, 0x01]));
    tlv(0x30, &body)
}

#[test]
fn weak_rsa_key_is_refused() {
    let weak = temp_file(pem("RSA PUBLIC KEY", &fake_rsa_pkcs1(1024)).as_bytes());
    assert!(config_error(&file_cfg(&["RS256"], Some(weak.path()), None)).contains("1024 bits"));
    let ok = temp_file(pem("RSA PUBLIC KEY", &fake_rsa_pkcs1(2048)).as_bytes());
    assert!(JwtVerifier::from_config(&file_cfg(&["RS256"], Some(ok.path()), None)).is_ok());
}

#[test]
fn pem_files_must_hold_one_public_key() {
    let (kp, _, public) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let private = temp_file(kp.serialize_pem().as_bytes());
    assert!(
        config_error(&file_cfg(&["ES256"], Some(private.path()), None)).contains("private key")
    );
    let two = temp_file(format!("{0}{0}", kp.public_key_pem()).as_bytes());
    assert!(config_error(&file_cfg(&["ES256"], Some(two.path()), None)).contains("several"));
    let cert = temp_file(pem("CERTIFICATE", b"\x30\x00").as_bytes());
    assert!(
        config_error(&file_cfg(&["ES256"], Some(cert.path()), None)).contains("not a public key")
    );
    let junk = temp_file(b"hello");
    assert!(config_error(&file_cfg(&["ES256"], Some(junk.path()), None)).contains("no PEM block"));
    let garbage = temp_file(pem("PUBLIC KEY", b"\x01\x02\x03").as_bytes());
    config_error(&file_cfg(&["ES256"], Some(garbage.path()), None));
    drop(public);
}

/// A JWK for an rcgen EC P-256 key pair.
pub(super) fn ec_jwk(kp: &KeyPair, kid: &str) -> serde_json::Value {
    let point = kp.public_key_raw();
    assert_eq!(point.len(), 65);
    json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..]),
    })
}

fn jwks_file(keys: serde_json::Value) -> tempfile::NamedTempFile {
    temp_file(json!({ "keys": keys }).to_string().as_bytes())
}

#[test]
fn jwks_selects_the_key_by_kid() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let (k2, e2, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let file = jwks_file(json!([ec_jwk(&k1, "k1"), ec_jwk(&k2, "k2")]));
    let v = verifier(&file_cfg(&["ES256"], None, Some(file.path())));
    v.self_test().unwrap();

    let t1 = sign(&json!({"alg": "ES256", "kid": "k1"}), &good_claims(), &e1);
    let t2 = sign(&json!({"alg": "ES256", "kid": "k2"}), &good_claims(), &e2);
    assert_eq!(v.verify(&t1).unwrap().kid.as_deref(), Some("k1"));
    assert_eq!(v.verify(&t2).unwrap().kid.as_deref(), Some("k2"));

    // Right kid, wrong key.
    let swapped = sign(&json!({"alg": "ES256", "kid": "k1"}), &good_claims(), &e2);
    assert_rejected(&v, &swapped, "bad_signature", true);
    let unknown = sign(&json!({"alg": "ES256", "kid": "k3"}), &good_claims(), &e1);
    let err = assert_rejected(&v, &unknown, "unknown_kid", true);
    assert_eq!(err.to_string(), "token signed with an unknown key id");
    let no_kid = sign(&json!({"alg": "ES256"}), &good_claims(), &e1);
    assert_rejected(&v, &no_kid, "missing_kid", true);
}

#[test]
fn jwks_mixed_families_bind_each_key_to_its_algorithms() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let rsa = rsa_pair();
    let comps = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.kp.public_key());
    let rsa_jwk = json!({"kty": "RSA", "kid": "r1", "n": b64(&comps.n), "e": b64(&comps.e)});
    let oct_jwk = json!({"kty": "oct", "kid": "h1", "k": b64(SECRET.as_bytes())});
    let file = jwks_file(json!([ec_jwk(&k1, "e1"), rsa_jwk, oct_jwk]));
    let v = verifier(&file_cfg(
        &["ES256", "RS256", "HS256"],
        None,
        Some(file.path()),
    ));
    v.self_test().unwrap();

    assert!(v
        .verify(&sign(
            &json!({"alg": "ES256", "kid": "e1"}),
            &good_claims(),
            &e1
        ))
        .is_ok());
    assert!(v
        .verify(&sign(
            &json!({"alg": "RS256", "kid": "r1"}),
            &good_claims(),
            &rsa.enc
        ))
        .is_ok());
    let hmac = EncodingKey::from_secret(SECRET.as_bytes());
    assert!(v
        .verify(&sign(
            &json!({"alg": "HS256", "kid": "h1"}),
            &good_claims(),
            &hmac
        ))
        .is_ok());

    // An allowed algorithm aimed at a key of another family.
    assert_rejected(
        &v,
        &sign(&json!({"alg": "HS256", "kid": "r1"}), &good_claims(), &hmac),
        "algorithm",
        true,
    );
    assert_rejected(
        &v,
        &sign(
            &json!({"alg": "RS256", "kid": "e1"}),
            &good_claims(),
            &rsa.enc,
        ),
        "algorithm",
        true,
    );
}

#[test]
fn jwks_single_key_needs_no_kid_and_jwk_alg_restricts() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let mut jwk = ec_jwk(&k1, "only");
    let file = jwks_file(json!([jwk.clone()]));
    let v = verifier(&file_cfg(&["ES256"], None, Some(file.path())));
    assert!(v
        .verify(&sign(&json!({"alg": "ES256"}), &good_claims(), &e1))
        .is_ok());
    assert_rejected(
        &v,
        &sign(
            &json!({"alg": "ES256", "kid": "other"}),
            &good_claims(),
            &e1,
        ),
        "unknown_kid",
        true,
    );

    // A key without kid in a one-key set accepts any kid.
    jwk.as_object_mut().unwrap().remove("kid");
    let file = jwks_file(json!([jwk]));
    let v = verifier(&file_cfg(&["ES256"], None, Some(file.path())));
    assert!(v
        .verify(&sign(
            &json!({"alg": "ES256", "kid": "any"}),
            &good_claims(),
            &e1
        ))
        .is_ok());

    // An oct key marked HS512 cannot verify HS256 even when HS256 is allowed.
    let oct = json!({"kty": "oct", "kid": "h", "alg": "HS512", "k": b64(SECRET.as_bytes())});
    let file = jwks_file(json!([oct]));
    let v = verifier(&file_cfg(&["HS256", "HS512"], None, Some(file.path())));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    assert!(v
        .verify(&sign(
            &json!({"alg": "HS512", "kid": "h"}),
            &good_claims(),
            &key
        ))
        .is_ok());
    assert_rejected(
        &v,
        &sign(&json!({"alg": "HS256", "kid": "h"}), &good_claims(), &key),
        "algorithm",
        true,
    );
}

#[test]
fn jwks_skips_foreign_keys_and_refuses_broken_ones() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let enc_key = json!({"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"});
    let p521 = json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"});
    let x25519 = json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": "AA"});
    let oaep = json!({"kty": "RSA", "alg": "RSA-OAEP", "kid": "oaep", "n": "AQAB", "e": "AQAB"});
    let file = jwks_file(json!([enc_key, p521, x25519, oaep, ec_jwk(&k1, "k1")]));
    let v = verifier(&file_cfg(&["ES256"], None, Some(file.path())));
    assert!(v
        .verify(&sign(
            &json!({"alg": "ES256", "kid": "k1"}),
            &good_claims(),
            &e1
        ))
        .is_ok());
    assert_rejected(
        &v,
        &sign(&json!({"alg": "ES256", "kid": "enc"}), &good_claims(), &e1),
        "unknown_kid",
        true,
    );

    let cfg = |file: &tempfile::NamedTempFile| {
        file_cfg(&["ES256", "HS256", "RS256"], None, Some(file.path()))
    };
    let dup = jwks_file(json!([ec_jwk(&k1, "k1"), ec_jwk(&k1, "k1")]));
    assert!(config_error(&cfg(&dup)).contains("duplicate kid"));
    let mut no_kid = ec_jwk(&k1, "x");
    no_kid.as_object_mut().unwrap().remove("kid");
    let kidless = jwks_file(json!([no_kid, ec_jwk(&k1, "k1")]));
    assert!(config_error(&cfg(&kidless)).contains("needs a \"kid\""));
    let short_oct = jwks_file(json!([{"kty": "oct", "kid": "h", "k": b64(b"short")}]));
    assert!(config_error(&cfg(&short_oct)).contains("shorter than 32 bytes"));
    let weak_rsa =
        jwks_file(json!([{"kty": "RSA", "kid": "r", "n": b64(&[0xC5; 128]), "e": "AQAB"}]));
    assert!(config_error(&cfg(&weak_rsa)).contains("1024 bits"));
    let bad_point =
        jwks_file(json!([{"kty": "EC", "crv": "P-256", "kid": "e", "x": "AAAA", "y": "AAAA"}]));
    assert!(config_error(&cfg(&bad_point)).contains("wrong length"));
    let none_usable = jwks_file(json!([ec_jwk(&k1, "k1")]));
    assert!(
        config_error(&file_cfg(&["RS256"], None, Some(none_usable.path())))
            .contains("no key usable")
    );
    let not_jwks = temp_file(br#"{"kid":"k"}"#);
    assert!(config_error(&cfg(&not_jwks)).contains("\"keys\""));
    let dup_member = temp_file(br#"{"keys":[],"keys":[]}"#);
    assert!(config_error(&cfg(&dup_member)).contains("duplicate"));
}

#[test]
fn verifier_debug_shows_no_key_material() {
    let v = verifier(&hs_cfg());
    let text = format!("{v:?}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("Hmac"), "{text}");
}
