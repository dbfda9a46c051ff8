//! The console's SHOW result sets, built from the session registry, the pools and the
//! running config. SHOW CONFIG lists only fields known to hold no secret, and shows the
//! rest (JWT secret, passwords in URLs, signed-context keys) as `(redacted)`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use humantime_serde::re::humantime;

use super::commands::HELP;
use super::render::{Kind, ResultSet};
use crate::config::{Config, SessionLifetime, UpstreamKind};
use crate::server::{Runtime, Shared};
use crate::tenant::TenantId;

const REDACTED: &str = "(redacted)";

fn text(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}

fn time(t: SystemTime) -> Option<String> {
    text(humantime::format_rfc3339_seconds(t))
}

fn kind_name(kind: UpstreamKind) -> &'static str {
    match kind {
        UpstreamKind::Shared => "shared",
        UpstreamKind::Dedicated => "dedicated",
    }
}

/// Configured tenants, tenants with sessions, and paused or suspended ones.
pub fn tenants(shared: &Shared, rt: &Runtime) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("tenant", Kind::Text),
        ("upstream", Kind::Text),
        ("kind", Kind::Text),
        ("sessions", Kind::Int),
        ("state", Kind::Text),
    ]);
    let holds = shared.sessions.current_holds();
    let mut open: BTreeMap<String, u64> = BTreeMap::new();
    for s in shared.sessions.sessions() {
        *open.entry(s.info.tenant.as_str().to_string()).or_default() += 1;
    }
    let names: BTreeSet<String> = rt
        .config
        .tenants
        .map
        .keys()
        .chain(open.keys())
        .chain(holds.paused.iter())
        .chain(holds.suspended.iter())
        .cloned()
        .collect();
    for name in names {
        let route = rt.router.route(&TenantId::new_validated(&name)).ok();
        let state = if holds.suspended.contains(&name) {
            "suspended"
        } else if holds.all_paused || holds.paused.contains(&name) {
            "paused"
        } else {
            "running"
        };
        rs.push(vec![
            text(&name),
            route.as_ref().map(|r| r.upstream.to_string()),
            route.as_ref().map(|r| kind_name(r.kind).to_string()),
            text(open.get(&name).copied().unwrap_or(0)),
            text(state),
        ]);
    }
    if let Some(default) = &rt.config.tenants.default {
        let kind = rt.config.upstreams.get(default).map(|u| kind_name(u.kind));
        rs.push(vec![
            text("(default)"),
            text(default),
            kind.map(str::to_string),
            None,
            text(if holds.all_paused {
                "paused"
            } else {
                "running"
            }),
        ]);
    }
    rs
}

/// One row per upstream of the running config.
pub fn pools(shared: &Shared, rt: &Runtime) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("upstream", Kind::Text),
        ("kind", Kind::Text),
        ("pool_size", Kind::Int),
        ("connections", Kind::Int),
        ("idle", Kind::Int),
        ("in_use", Kind::Int),
        ("waiting", Kind::Int),
        ("sessions", Kind::Int),
    ]);
    let mut sessions: BTreeMap<String, u64> = BTreeMap::new();
    for s in shared.sessions.sessions() {
        *sessions.entry(s.info.upstream.to_string()).or_default() += 1;
    }
    for p in rt.pools.stats() {
        let up = rt.config.upstreams.get(&*p.name);
        rs.push(vec![
            text(&p.name),
            up.map(|u| kind_name(u.kind).to_string()),
            up.map(|u| u.pool_size.to_string()),
            text(p.connections),
            text(p.idle),
            text(p.connections.saturating_sub(p.idle)),
            text(p.pending_waiters),
            text(sessions.get(&*p.name).copied().unwrap_or(0)),
        ]);
    }
    rs
}

pub fn clients(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("id", Kind::Int),
        ("tenant", Kind::Text),
        ("user", Kind::Text),
        ("upstream", Kind::Text),
        ("addr", Kind::Text),
        ("application_name", Kind::Text),
        ("connected_at", Kind::Text),
        ("state", Kind::Text),
        ("server_id", Kind::Int),
        ("backend_pid", Kind::Int),
        ("queries", Kind::Int),
        ("client_bytes", Kind::Int),
        ("server_bytes", Kind::Int),
        ("token_expires_at", Kind::Text),
    ]);
    for s in shared.sessions.sessions() {
        let server = s.live.server();
        let totals = s.live.totals();
        let exp = UNIX_EPOCH + std::time::Duration::from_secs(s.info.token_expires_at);
        rs.push(vec![
            text(s.id),
            text(&s.info.tenant),
            text(&s.info.user),
            text(&s.info.upstream),
            text(s.info.peer),
            s.info.application_name.clone(),
            time(s.connected_at),
            text(s.live.state().as_str()),
            server.map(|(id, _)| id.to_string()),
            server.map(|(_, pid)| pid.to_string()),
            text(totals.queries),
            text(totals.client_bytes),
            text(totals.server_bytes),
            time(exp),
        ]);
    }
    rs
}

/// The server connections pinned to live sessions (idle pooled ones are counted by SHOW POOLS).
pub fn servers(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("server_id", Kind::Int),
        ("backend_pid", Kind::Int),
        ("upstream", Kind::Text),
        ("tenant", Kind::Text),
        ("client_id", Kind::Int),
        ("state", Kind::Text),
    ]);
    for s in shared.sessions.sessions() {
        let Some((id, pid)) = s.live.server() else {
            continue;
        };
        rs.push(vec![
            text(id),
            text(pid),
            text(&s.info.upstream),
            text(&s.info.tenant),
            text(s.id),
            text(s.live.state().as_str()),
        ]);
    }
    rs
}

/// Per tenant and upstream since start: ended sessions plus live ones so far (a live
/// session's counters are as of its last request).
pub fn stats(shared: &Shared) -> ResultSet {
    let mut rs = ResultSet::new(&[
        ("tenant", Kind::Text),
        ("upstream", Kind::Text),
        ("sessions_total", Kind::Int),
        ("sessions_open", Kind::Int),
        ("queries", Kind::Int),
        ("client_bytes", Kind::Int),
        ("server_bytes", Kind::Int),
    ]);
    for ((tenant, upstream), (t, open)) in shared.sessions.totals() {
        rs.push(vec![
            text(tenant),
            text(upstream),
            text(t.sessions),
            text(open),
            text(t.queries),
            text(t.client_bytes),
            text(t.server_bytes),
        ]);
    }
    rs
}

pub fn help() -> ResultSet {
    let mut rs = ResultSet::new(&[("command", Kind::Text), ("description", Kind::Text)]);
    for (command, description) in HELP {
        rs.push(vec![text(command), text(description)]);
    }
    rs
}

pub fn config(cfg: &Config, path: Option<&Path>) -> ResultSet {
    let mut rs = ResultSet::new(&[("key", Kind::Text), ("value", Kind::Text)]);
    for (key, value) in config_rows(cfg, path) {
        rs.push(vec![Some(key), value]);
    }
    rs
}

/// `key = value` rows of the running config. Only fields listed here are shown, so a secret
/// added to the config later stays hidden until someone decides to list it.
pub fn config_rows(cfg: &Config, path: Option<&Path>) -> Vec<(String, Option<String>)> {
    let mut rows: Vec<(String, Option<String>)> = Vec::new();
    let mut put = |key: String, value: Option<String>| rows.push((key, value));
    let path_text = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    put("config_file".into(), path.map(|p| p.display().to_string()));
    put("listen.addr".into(), text(cfg.listen.addr));
    put("listen.tls".into(), text(snake(&cfg.listen.tls)));
    put("listen.tls_cert".into(), path_text(&cfg.listen.tls_cert));
    put(
        "listen.forward_params".into(),
        text(cfg.listen.forward_params.join(", ")),
    );
    put(
        "admin.addr".into(),
        cfg.admin.as_ref().map(|a| a.addr.to_string()),
    );
    let jwt = &cfg.jwt;
    put("jwt.algorithms".into(), text(jwt.algorithms.join(", ")));
    put(
        "jwt.secret".into(),
        jwt.secret.as_ref().map(|_| REDACTED.into()),
    );
    put("jwt.secret_file".into(), path_text(&jwt.secret_file));
    put(
        "jwt.public_key_file".into(),
        path_text(&jwt.public_key_file),
    );
    put("jwt.jwks_file".into(), path_text(&jwt.jwks_file));
    put("jwt.issuer".into(), jwt.issuer.clone());
    put("jwt.audience".into(), jwt.audience.clone());
    put("jwt.tenant_claim".into(), text(&jwt.tenant_claim));
    put("jwt.user_claim".into(), text(&jwt.user_claim));
    put("jwt.leeway_secs".into(), text(jwt.leeway_secs));
    put("jwt.tenant_pattern".into(), text(&jwt.tenant_pattern));
    put(
        "jwt.session_max_lifetime".into(),
        jwt.session_max_lifetime.map(|l| match l {
            SessionLifetime::Token => "token".to_string(),
            SessionLifetime::Fixed(d) => humantime::format_duration(d).to_string(),
        }),
    );
    for (name, up) in &cfg.upstreams {
        let k = |field: &str| format!("upstreams.{name}.{field}");
        put(k("kind"), text(kind_name(up.kind)));
        put(k("url"), text(redact_url(&up.url)));
        put(k("pool_size"), text(up.pool_size));
        put(k("checkout_timeout"), duration(up.checkout_timeout));
        put(k("connect_timeout"), duration(up.connect_timeout));
        put(k("idle_timeout"), duration(up.idle_timeout));
        put(k("tls"), text(snake(&up.tls)));
        if up.kind == UpstreamKind::Shared {
            put(k("tenant_setting"), text(&up.tenant_setting));
            put(k("context"), text(snake(&up.context)));
            put(k("guard"), text(up.guard));
        }
        if let Some(signed) = &up.signed_context {
            put(k("signed_context.schema"), text(&signed.schema));
            put(k("signed_context.key_id"), signed.key_id.clone());
            put(
                k("signed_context.key"),
                signed.key.as_ref().map(|_| REDACTED.into()),
            );
            put(k("signed_context.key_file"), path_text(&signed.key_file));
        }
        if let Some(url) = &up.audit_url {
            put(k("audit_url"), text(redact_url(url)));
        }
    }
    put("tenants.default".into(), cfg.tenants.default.clone());
    for (tenant, up) in &cfg.tenants.map {
        put(format!("tenants.{tenant}"), text(up));
    }
    let l = &cfg.limits;
    put("limits.auth_timeout".into(), duration(l.auth_timeout));
    put(
        "limits.max_client_frame_bytes".into(),
        text(l.max_client_frame_bytes),
    );
    put(
        "limits.max_client_connections".into(),
        text(l.max_client_connections),
    );
    put(
        "limits.max_pre_auth_connections".into(),
        text(l.max_pre_auth_connections),
    );
    put(
        "limits.shutdown_timeout".into(),
        duration(l.shutdown_timeout),
    );
    put("console.enabled".into(), text(cfg.console.enabled));
    put("console.database".into(), text(&cfg.console.database));
    put("console.admin_claim".into(), text(&cfg.console.admin_claim));
    put(
        "console.admin_value".into(),
        cfg.console.admin_value.clone(),
    );
    if let Some(audit) = &cfg.audit {
        put("audit.url".into(), text(redact_url(&audit.url)));
        put("audit.table".into(), text(&audit.table));
        put("audit.level".into(), text(snake(&audit.level)));
        put("audit.spool_dir".into(), text(audit.spool_dir.display()));
        put("audit.on_full".into(), text(snake(&audit.on_full)));
        put("audit.sink".into(), text(snake(&audit.sink)));
    }
    rows
}

fn duration(d: std::time::Duration) -> Option<String> {
    text(humantime::format_duration(d))
}

/// A unit enum's serde spelling, from its Debug name (`FailClosed` → `fail_closed`).
fn snake(v: &impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The URL with its password replaced; an unparsable URL is not shown at all.
fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            // Query parameters (`password=...`) are dropped too.
            u.set_query(None);
            u.to_string()
        }
        Err(_) => REDACTED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-jwt-secret";

    fn cfg() -> Config {
        let text = format!(
            r#"
[listen]
[jwt]
secret = "{SECRET}"
session_max_lifetime = "token"
[upstreams.shared]
kind = "shared"
url = "postgres://pgtenant:db-pass-1@127.0.0.1:5432/saas?password=db-pass-2"
context = "signed"
[upstreams.shared.signed_context]
key_id = "k1"
key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
[tenants]
default = "shared"
acme = "shared"
"#
        );
        let cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn config_rows_never_hold_secrets() {
        let rows = config_rows(&cfg(), None);
        let all: String = rows
            .iter()
            .map(|(k, v)| format!("{k}={}\n", v.as_deref().unwrap_or("")))
            .collect();
        for secret in [SECRET, "db-pass-1", "db-pass-2", "00112233445566778899"] {
            assert!(!all.contains(secret), "{secret} leaked:\n{all}");
        }
        let get = |key: &str| {
            rows.iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(get("jwt.secret").as_deref(), Some(REDACTED));
        assert_eq!(
            get("upstreams.shared.url").as_deref(),
            Some("postgres://pgtenant:redacted@127.0.0.1:5432/saas")
        );
        assert_eq!(get("upstreams.shared.context").as_deref(), Some("signed"));
        assert_eq!(get("tenants.acme").as_deref(), Some("shared"));
        assert_eq!(get("jwt.session_max_lifetime").as_deref(), Some("token"));
    }

    #[test]
    fn enum_names_and_urls() {
        assert_eq!(snake(&crate::audit::OnFull::FailClosed), "fail_closed");
        assert_eq!(redact_url("not a url with secret"), REDACTED);
        assert_eq!(
            redact_url("postgres://u@h:5/db"),
            "postgres://u@h:5/db",
            "no password, nothing to hide"
        );
    }
}
