//! Transaction mode, per client: the settings pgtenant re-applies when the client lands on
//! another server connection, the setup that does it, and the `ClientFilter` that finds
//! session-only features (pin or refuse) and tracked `SET`s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tracing::info;

use crate::config::SessionFeatures;
use crate::error::SESSION_FEATURE_REFUSED;
use crate::metrics as m;
use crate::pool::Settings;
use crate::session::relay::{ClientFilter, Refusal, SetupAnswer};

use super::features::{self, Feature, SettingChange};

/// The client's settings: the tenant setting (shared upstreams) first, then its allow-listed
/// startup parameters and tracked `SET`s, by lower-case name.
#[derive(Debug)]
pub struct ClientSettings {
    tenant: Option<(String, String)>,
    params: Vec<(String, String)>,
    snapshot: Option<Settings>,
}

impl ClientSettings {
    pub fn new(tenant: Option<(&str, &str)>, params: &[(&str, &str)]) -> Self {
        ClientSettings {
            tenant: tenant.map(|(k, v)| (k.to_owned(), v.to_owned())),
            params: params
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
                .collect(),
            snapshot: None,
        }
    }

    /// What a server connection carries once these settings are applied (cached).
    pub fn snapshot(&mut self) -> Settings {
        if let Some(s) = &self.snapshot {
            return s.clone();
        }
        let all: Settings = self
            .tenant
            .iter()
            .chain(self.params.iter())
            .cloned()
            .collect();
        self.snapshot = Some(all.clone());
        all
    }

    pub fn apply(&mut self, change: SettingChange) {
        self.snapshot = None;
        match change {
            SettingChange::Set(name, value) => {
                match self.params.iter_mut().find(|(k, _)| *k == name) {
                    Some(slot) => slot.1 = value,
                    None => self.params.push((name, value)),
                }
            }
            SettingChange::Reset(name) => self.params.retain(|(k, _)| *k != name),
            SettingChange::ResetAll => self.params.clear(),
        }
    }

    /// The setup a connection that carries `carried` needs before this client's frames, or
    /// `None` when it already carries exactly these settings (the affinity fast path).
    ///
    /// - `carried == None` (new, or reset with DISCARD ALL): `set_config` of everything.
    /// - `carried` = other settings of the same tenant: `RESET ALL` first (so nothing of the
    ///   previous client's settings survives), then `set_config` of everything.
    ///
    /// Every value is a bind parameter; `pg_catalog.` is explicit so no function of the
    /// client's making can stand in for `set_config`.
    pub fn setup_for(&mut self, carried: Option<&Settings>) -> Option<(BytesMut, SetupAnswer)> {
        let want = self.snapshot();
        if carried == Some(&want) {
            return None;
        }
        let mut out = BytesMut::new();
        let mut cycles = 0u8;
        if carried.is_some_and(|c| !c.is_empty()) {
            frontend::query("RESET ALL", &mut out).ok()?;
            cycles += 1;
        }
        if !want.is_empty() {
            set_config(&want, &mut out)?;
            cycles += 1;
        }
        if cycles == 0 {
            return None;
        }
        let tenant = self.tenant.as_ref().map(|(_, t)| t.as_str());
        Some((out, SetupAnswer::new(cycles, tenant)))
    }
}

/// The query that reads back, after a transaction, what the client's `SET`s of tracked
/// parameters really left on the server: a SET inside a rolled-back transaction, or one
/// that failed, changed nothing, and PostgreSQL's own display value is what gets
/// re-applied. `$1` is a text array of lower-case names. Columns: name, current value,
/// whether the session set it (`source = 'session'`; otherwise it is back to its default).
pub const READ_BACK_SQL: &str = "SELECT lower(name), pg_catalog.current_setting(name), \
     source = 'session' FROM pg_catalog.pg_settings WHERE lower(name) = ANY($1::text[])";

/// The names `changes` touch (all tracked ones for `RESET ALL`), as `READ_BACK_SQL`'s
/// array parameter; `None` when there are none.
pub fn read_back_names(changes: &[SettingChange]) -> Option<String> {
    let mut names: Vec<&str> = Vec::new();
    for change in changes {
        match change {
            SettingChange::Set(name, _) | SettingChange::Reset(name) => names.push(name),
            SettingChange::ResetAll => names.extend(features::TRACKED.iter().copied()),
        }
    }
    names.sort_unstable();
    names.dedup();
    // Tracked names are plain lower-case identifiers: no quoting needed in the literal.
    (!names.is_empty()).then(|| format!("{{{}}}", names.join(",")))
}

/// `READ_BACK_SQL`'s DataRow bodies as the changes to keep; `None` if a row is malformed.
pub fn read_back_changes(rows: &[bytes::Bytes]) -> Option<Vec<SettingChange>> {
    rows.iter()
        .map(|row| {
            let mut fields = data_row_fields(row)?.into_iter();
            let (name, value, session) = (fields.next()??, fields.next()??, fields.next()??);
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            Some(if session == b"t" {
                SettingChange::Set(text(name), text(value))
            } else {
                SettingChange::Reset(text(name))
            })
        })
        .collect()
}

/// The fields of a DataRow body (`None` for SQL NULL).
fn data_row_fields(mut body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    body = &body[2..];
    let mut fields = Vec::with_capacity(usize::try_from(count).ok()?);
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        body = &body[4..];
        if len < 0 {
            fields.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        fields.push(Some(body.get(..len)?));
        body = &body[len..];
    }
    Some(fields)
}

/// Parse/Bind/Execute/Sync of `SELECT pg_catalog.set_config($1,$2,false), ...`.
fn set_config(settings: &[(String, String)], out: &mut BytesMut) -> Option<()> {
    let mut sql = String::from("SELECT ");
    for i in 0..settings.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "pg_catalog.set_config(${}::text,${}::text,false)",
            2 * i + 1,
            2 * i + 2
        ));
    }
    frontend::parse("", &sql, std::iter::empty(), out).ok()?;
    let values = settings.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]);
    frontend::bind(
        "",
        "",
        [0i16],
        values,
        |v, buf| {
            buf.put_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        [0i16],
        out,
    )
    .ok()?;
    frontend::execute("", 0, out).ok()?;
    frontend::sync(out);
    Some(())
}

/// The `ClientFilter` of transaction mode (last in the chain, after the guard).
pub struct FeatureFilter<'a> {
    pub mode: SessionFeatures,
    pub upstream: &'a str,
    pinned: AtomicBool,
    /// Tracked setting changes seen since the last `take_changes`.
    changes: Mutex<Vec<SettingChange>>,
    /// The last statement text that needed nothing (empty: none yet).
    last_plain: Mutex<Vec<u8>>,
}

impl<'a> FeatureFilter<'a> {
    pub fn new(mode: SessionFeatures, upstream: &'a str) -> Self {
        FeatureFilter {
            mode,
            upstream,
            pinned: AtomicBool::new(false),
            changes: Mutex::new(Vec::new()),
            last_plain: Mutex::new(Vec::new()),
        }
    }

    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    pub fn take_changes(&self) -> Vec<SettingChange> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Pins the session for `feature` (counted once per session), whatever the mode.
    pub fn pin(&self, feature: Feature) {
        if !self.pinned.swap(true, Ordering::Relaxed) {
            metrics::counter!(m::PINNED_SESSIONS_TOTAL, "upstream" => self.upstream.to_string(), "reason" => feature.label())
                .increment(1);
            info!(
                upstream = self.upstream,
                reason = feature.label(),
                "session pinned to its server connection"
            );
        }
    }

    fn found(&self, feature: Feature) -> Option<Refusal> {
        // Unparsable text pins in both modes: pinning is always safe. (Named statements
        // never get here: the relay renames them per connection.)
        if self.mode == SessionFeatures::Pin || feature == Feature::Unparsed {
            self.pin(feature);
            return None;
        }
        metrics::counter!(m::SESSION_FEATURES_REFUSED_TOTAL, "upstream" => self.upstream.to_string(), "feature" => feature.label())
            .increment(1);
        Some(Refusal {
            code: SESSION_FEATURE_REFUSED,
            message: format!(
                "pgtenant: {} needs a server connection of its own, which transaction pooling does not keep (session_features = \"refuse\")",
                feature.describe()
            ),
        })
    }
}

impl ClientFilter for FeatureFilter<'_> {
    fn check_sql(&self, sql: &str) -> Option<Refusal> {
        // Clients repeat their statements (drivers, ORMs, pgbench): the last text that
        // needed nothing is remembered and not scanned again.
        let mut last_plain = self.last_plain.lock().unwrap_or_else(|e| e.into_inner());
        if *last_plain == sql.as_bytes() {
            return None;
        }
        let inspection = features::inspect(sql);
        if inspection == features::Inspection::default() {
            last_plain.clear();
            last_plain.extend_from_slice(sql.as_bytes());
            return None;
        }
        drop(last_plain);
        if let Some(refusal) = inspection.feature.and_then(|f| self.found(f)) {
            // Refused as a whole: none of its settings take effect.
            return Some(refusal);
        }
        if !inspection.changes.is_empty() {
            self.changes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(inspection.changes);
        }
        None
    }

    fn check_parse(&self, _name: &[u8], sql: &str) -> Option<Refusal> {
        // Named statements do not pin: the relay renames them per server connection
        // (`crate::prepared`). Only the text is checked, as for a simple Query.
        self.check_sql(sql)
    }

    fn check_function_call(&self) -> Option<Refusal> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn setup_is_skipped_only_for_exactly_the_same_settings() {
        let mut s = ClientSettings::new(Some(("app.t", "acme")), &[("application_name", "a")]);
        let snap = s.snapshot();
        assert!(s.setup_for(Some(&snap)).is_none());
        let (bytes, _) = s.setup_for(None).expect("new connection needs setup");
        assert_eq!(
            bytes[0], b'P',
            "no RESET ALL on a connection without settings"
        );
        let other: Settings = Arc::from(vec![("app.t".to_string(), "acme".to_string())]);
        let (bytes, _) = s.setup_for(Some(&other)).expect("different settings");
        assert_eq!(bytes[0], b'Q', "RESET ALL first");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("pg_catalog.set_config($1::text,$2::text,false)"));
        assert!(!text.contains("SELECT set_config"));
    }

    #[test]
    fn changes_apply_and_change_the_snapshot() {
        let mut s = ClientSettings::new(Some(("app.t", "acme")), &[("Application_Name", "a")]);
        let before = s.snapshot();
        s.apply(SettingChange::Set("application_name".into(), "b".into()));
        s.apply(SettingChange::Set("search_path".into(), "\"x\"".into()));
        let after = s.snapshot();
        assert_ne!(before, after);
        assert_eq!(
            &after[..],
            &[
                ("app.t".to_string(), "acme".to_string()),
                ("application_name".to_string(), "b".to_string()),
                ("search_path".to_string(), "\"x\"".to_string()),
            ]
        );
        s.apply(SettingChange::Reset("search_path".into()));
        s.apply(SettingChange::ResetAll);
        assert_eq!(s.snapshot().len(), 1, "the tenant setting stays");
    }

    #[test]
    fn refuse_mode_refuses_features_and_named_statements_do_not_pin() {
        let f = FeatureFilter::new(SessionFeatures::Refuse, "up");
        let r = f.check_sql("LISTEN x").expect("refused");
        assert_eq!(r.code, "0A000");
        assert!(r.message.contains("LISTEN"));
        assert!(!f.pinned());
        assert!(f.check_sql("SET search_path = a; LISTEN x").is_some());
        assert!(
            f.take_changes().is_empty(),
            "a refused text changes nothing"
        );
        assert!(f.check_parse(b"s1", "SELECT 1").is_none());
        assert!(
            !f.pinned(),
            "named statements are renamed per connection, not pinned"
        );
        let p = FeatureFilter::new(SessionFeatures::Pin, "up");
        assert!(p.check_sql("SET application_name = 'x'").is_none());
        assert!(!p.pinned());
        assert_eq!(p.take_changes().len(), 1);
        assert!(p.check_sql("CREATE TEMP TABLE t (x int)").is_none());
        assert!(p.pinned());
    }

    #[test]
    fn read_back_rows_become_the_changes_to_keep() {
        assert_eq!(read_back_names(&[]), None);
        let names = read_back_names(&[
            SettingChange::Set("search_path".into(), "x".into()),
            SettingChange::Reset("search_path".into()),
            SettingChange::Set("application_name".into(), "a".into()),
        ]);
        assert_eq!(names.as_deref(), Some("{application_name,search_path}"));
        assert!(read_back_names(&[SettingChange::ResetAll])
            .unwrap()
            .contains("statement_timeout"));
        let row = |fields: &[&[u8]]| {
            let mut b = (fields.len() as i16).to_be_bytes().to_vec();
            for f in fields {
                b.extend_from_slice(&(f.len() as i32).to_be_bytes());
                b.extend_from_slice(f);
            }
            bytes::Bytes::from(b)
        };
        let rows = [
            row(&[b"search_path", b"public, pg_catalog", b"t"]),
            row(&[b"statement_timeout", b"0", b"f"]),
        ];
        assert_eq!(
            read_back_changes(&rows),
            Some(vec![
                SettingChange::Set("search_path".into(), "public, pg_catalog".into()),
                SettingChange::Reset("statement_timeout".into()),
            ])
        );
        assert_eq!(
            read_back_changes(&[bytes::Bytes::from_static(b"\0\x03")]),
            None
        );
    }

    #[test]
    fn a_remembered_plain_text_does_not_hide_the_next_one() {
        let f = FeatureFilter::new(SessionFeatures::Refuse, "up");
        for _ in 0..3 {
            assert!(f
                .check_sql("SELECT abalance FROM t WHERE aid = $1")
                .is_none());
        }
        assert!(f.check_sql("LISTEN x").is_some());
        assert!(
            f.check_sql("LISTEN x").is_some(),
            "refusals are not remembered"
        );
        assert!(f.check_sql("SET search_path = a").is_none());
        assert!(f.check_sql("SET search_path = a").is_none());
        assert_eq!(f.take_changes().len(), 2, "tracked SETs are never skipped");
    }
}
