//! JSON helpers for tokens: strict parsing that refuses duplicate members, claim paths with
//! dots ("app.tenant"), and NumericDate reading.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value whose objects, at any depth, have unique member names.
///
/// serde_json keeps the *last* of two equal keys while other parsers keep the first, so a
/// token carrying `"tenant_id"` twice could mean different tenants to the issuer's tooling
/// and to us (RFC 8725 §2.8, RFC 7515 §5.2). We refuse such tokens instead of choosing.
/// Nesting depth stays bounded by serde_json's recursion limit (128).
pub(crate) struct StrictValue(pub(crate) Value);

/// The claims set: a strict JSON object. Used as the payload type of `jsonwebtoken::decode`,
/// so claims are parsed once, after the signature has been checked.
pub(crate) struct StrictClaims(pub(crate) Map<String, Value>);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

impl<'de> Deserialize<'de> for StrictClaims {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(StrictVisitor)? {
            Value::Object(map) => Ok(StrictClaims(map)),
            _ => Err(de::Error::custom("claims are not a JSON object")),
        }
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value without duplicate object members")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                // The key is attacker-chosen text: keep it out of the error.
                return Err(de::Error::custom("duplicate object member"));
            }
            let StrictValue(v) = access.next_value()?;
            map.insert(key, v);
        }
        Ok(Value::Object(map))
    }
}

/// A configured claim name such as `tenant_id` or `app.tenant`.
///
/// Lookup tries the whole name as a top-level member first, so namespaced claims with dots
/// in their names (`https://example.com/tenant`) work; otherwise the dots address nested
/// objects. Both forms come from the signed token, so the issuer, not the client, decides.
#[derive(Debug, Clone)]
pub(crate) struct ClaimPath {
    name: String,
    segments: Vec<String>,
}

impl ClaimPath {
    /// Refuses empty names and empty segments ("a..b", ".a"), which could never match.
    pub(crate) fn parse(name: &str) -> Result<ClaimPath, String> {
        if name.is_empty() {
            return Err("claim name is empty".into());
        }
        let segments: Vec<String> = name.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("claim name {name:?} has an empty dotted segment"));
        }
        Ok(ClaimPath {
            name: name.to_owned(),
            segments,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The claim's value, if present. JSON `null` counts as present (and is then rejected
    /// by the type checks of the caller, not silently treated as missing).
    pub(crate) fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if let Some(v) = claims.get(&self.name) {
            return Some(v);
        }
        if self.segments.len() < 2 {
            return None;
        }
        let (first, rest) = self.segments.split_first()?;
        let mut cur = claims.get(first)?;
        for seg in rest {
            cur = cur.as_object()?.get(seg)?;
        }
        Some(cur)
    }
}

/// Reads a NumericDate the way jsonwebtoken does for `exp`/`nbf`: a non-negative integer,
/// or a finite non-negative float rounded to whole seconds.
pub(crate) fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 {
        Some(f.round() as u64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strict(text: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str::<StrictValue>(text).map(|v| v.0)
    }

    #[test]
    fn strict_parse_matches_serde_json_without_duplicates() {
        let text = r#"{"a":1,"b":[true,null,-2,1.5,"x"],"c":{"d":{"e":"f"}}}"#;
        assert_eq!(
            strict(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    #[test]
    fn duplicate_members_are_refused_at_any_depth() {
        assert!(strict(r#"{"a":1,"a":2}"#).is_err());
        assert!(strict(r#"{"x":{"a":1,"a":1}}"#).is_err());
        assert!(strict(r#"[{"a":1,"a":1}]"#).is_err());
        // Escapes decode to the same name, so this is a duplicate too.
        assert!(strict(r#"{"a":1,"\u0061":2}"#).is_err());
    }

    #[test]
    fn duplicate_error_does_not_echo_the_key() {
        let err = strict(r#"{"secretkeyname":1,"secretkeyname":2}"#).unwrap_err();
        assert!(!err.to_string().contains("secretkeyname"), "{err}");
    }

    #[test]
    fn claims_must_be_an_object() {
        assert!(serde_json::from_str::<StrictClaims>("[1]").is_err());
        assert!(serde_json::from_str::<StrictClaims>("\"x\"").is_err());
        assert!(serde_json::from_str::<StrictClaims>("{}").is_ok());
    }

    #[test]
    fn claim_paths() {
        let claims = json!({
            "tenant_id": "t1",
            "app": {"tenant": "t2", "n": 5},
            "https://example.com/tenant": "t3",
            "flat.dotted": "t4",
            "flat": {"dotted": "t5"},
        });
        let map = claims.as_object().unwrap();
        let get = |p: &str| ClaimPath::parse(p).unwrap().lookup(map).cloned();
        assert_eq!(get("tenant_id"), Some(json!("t1")));
        assert_eq!(get("app.tenant"), Some(json!("t2")));
        assert_eq!(get("https://example.com/tenant"), Some(json!("t3")));
        // An exact top-level name wins over the nested reading.
        assert_eq!(get("flat.dotted"), Some(json!("t4")));
        assert_eq!(get("app.missing"), None);
        assert_eq!(get("app.n.deeper"), None);
        assert_eq!(get("tenant_id.x"), None);
        assert!(ClaimPath::parse("").is_err());
        assert!(ClaimPath::parse("a..b").is_err());
        assert!(ClaimPath::parse(".a").is_err());
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&json!(5)), Some(5));
        assert_eq!(numeric_date(&json!(5.6)), Some(6));
        assert_eq!(numeric_date(&json!(-1)), None);
        assert_eq!(numeric_date(&json!(-1.5)), None);
        assert_eq!(numeric_date(&json!("5")), None);
        assert_eq!(numeric_date(&json!(1e300)), None);
    }
}
