//! The admin console: a PgBouncer-style virtual database (`[console] database`, default
//! `pgtenant`) for tokens that carry the admin claim. It answers simple Query messages with
//! text result sets any PostgreSQL client renders, and never opens a server connection.
//!
//! - `commands`: the pure parser (`SHOW ...`, `RELOAD`, `PAUSE`, `RESUME`, `SUSPEND`,
//!   `KILL`, `SHUTDOWN`);
//! - `render`: RowDescription/DataRow/CommandComplete/NoticeResponse;
//! - `show`: the SHOW result sets (SHOW CONFIG redacts secrets).
//!
//! Pauses and suspensions live in the process's session registry: each replica needs its
//! own command.

pub mod commands;
pub mod render;
pub mod show;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tracing::{info, warn};

use crate::audit::EventKind;
use crate::auth::Identity;
use crate::config::ConsoleConfig;
use crate::error::ClientError;
use crate::metrics as m;
use crate::protocol::frame::{read_frame, take_cstr};
use crate::protocol::messages::{self, Severity};
use crate::protocol::tags;
use crate::server::{Runtime, Shared};
use crate::session::relay::CompletedStatement;
use crate::session::{ClientConn, SessionAudit};

use commands::{Command, Show};

/// A console command that failed; the console session goes on.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("RELOAD rejected, the running config stays: {0}")]
    Reload(String),
}

/// Whether the verified claims grant the console: the claim is `true`, or, with
/// `admin_value` set, equals it, has it as a space-separated word, or is an array with it.
pub fn is_admin(cfg: &ConsoleConfig, claims: &Value) -> bool {
    let Some(value) = crate::auth::claim(claims, &cfg.admin_claim) else {
        return false;
    };
    match (&cfg.admin_value, value) {
        (None, Value::Bool(granted)) => *granted,
        (None, _) => false,
        (Some(want), Value::String(s)) => s.split_whitespace().any(|w| w == want),
        (Some(want), Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(want)),
        (Some(_), _) => false,
    }
}

/// Serves one console session to its end: refuses non-admin tokens (28000) and otherwise
/// answers commands until Terminate, the client leaves, or pgtenant shuts down.
pub async fn serve(
    mut conn: ClientConn,
    identity: &Identity,
    shared: &Shared,
    rt: &Runtime,
    audit: Option<&SessionAudit>,
) {
    let mut audit = audit.cloned();
    if let Some(a) = audit.as_mut() {
        a.set_upstream(&rt.config.console.database);
    }
    if !is_admin(&rt.config.console, &identity.claims) {
        let error = ClientError::NotAdmin;
        crate::session::m_auth_failure(error.label());
        if let Some(a) = &audit {
            a.refused(EventKind::AuthFailure, &error);
        }
        warn!(tenant = %identity.tenant, user = %identity.user, peer = %conn.peer, "console refused: the token has no admin claim");
        conn.send_error(&error).await;
        return;
    }
    info!(tenant = %identity.tenant, user = %identity.user, peer = %conn.peer, "console session started");
    if let Some(a) = &audit {
        a.session_start();
    }
    let started = Instant::now();
    let key = shared.cancels.register();
    let mut console = Console {
        shared,
        audit: audit.as_ref(),
        statements: audit.as_ref().is_some_and(SessionAudit::statements),
        commands: 0,
    };
    let end = console.run(&mut conn, key).await;
    shared.cancels.remove(key);
    let label = match &end {
        Ok(()) => "terminated",
        Err(e) => e.label(),
    };
    if let Some(a) = &audit {
        let totals = crate::audit::SessionTotals {
            duration: started.elapsed(),
            client_bytes: 0,
            server_bytes: 0,
            statements: console.commands,
        };
        a.session_end(totals, label);
    }
    info!(user = %identity.user, end = label, "console session ended");
    if let Err(error) = end {
        if !matches!(error, ClientError::ClientIo(_)) {
            conn.send_error(&error).await;
        }
    }
}

struct Console<'a> {
    shared: &'a Shared,
    audit: Option<&'a SessionAudit>,
    /// Audit each command as a statement (`[audit] level = "statement"`).
    statements: bool,
    commands: u64,
}

impl Console<'_> {
    /// The greeting, then one frame at a time until the session ends. `Ok` on Terminate.
    async fn run(
        &mut self,
        conn: &mut ClientConn,
        key: crate::cancel::ClientKey,
    ) -> Result<(), ClientError> {
        let mut out = BytesMut::with_capacity(1024);
        messages::auth_ok(&mut out);
        for (name, value) in [
            (
                "server_version",
                concat!("16.0 (pgtenant ", env!("CARGO_PKG_VERSION"), " console)"),
            ),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
        ] {
            messages::parameter_status(&mut out, name, value);
        }
        messages::backend_key_data(&mut out, key.pid, key.secret);
        messages::ready_for_query(&mut out, b'I');
        conn.write_flush(&out).await?;

        let mut shutdown = self.shared.shutdown.clone();
        // After an extended-protocol message: skip until Sync, as PostgreSQL does after an error.
        let mut skipping = false;
        loop {
            let (tag, len) = tokio::select! {
                biased;
                _ = shutdown.wait_for(|down| *down) => return Err(ClientError::ShuttingDown),
                frame = read_frame(&mut conn.io, &mut conn.read_buf, conn.max_frame) => frame?,
            };
            let frame_len = 5 + len;
            out.clear();
            match tag {
                tags::QUERY => {
                    let sql = {
                        let mut body = &conn.read_buf[5..frame_len];
                        take_cstr(&mut body)
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .ok_or_else(|| ClientError::Protocol("invalid Query message".into()))?
                    };
                    self.query(&sql, &mut out).await;
                    messages::ready_for_query(&mut out, b'I');
                }
                tags::TERMINATE => return Ok(()),
                tags::SYNC => {
                    skipping = false;
                    messages::ready_for_query(&mut out, b'I');
                }
                tags::PARSE
                | tags::BIND
                | tags::DESCRIBE
                | tags::EXECUTE
                | tags::CLOSE
                | tags::FLUSH
                | tags::FUNCTION_CALL => {
                    if !skipping && tag != tags::FLUSH {
                        let error = ConsoleError::Unsupported(
                            "the pgtenant console speaks the simple query protocol only".into(),
                        );
                        error_response(&mut out, &error.into());
                        skipping = tag != tags::FUNCTION_CALL;
                        if tag == tags::FUNCTION_CALL {
                            messages::ready_for_query(&mut out, b'I');
                        }
                    }
                }
                tags::COPY_DATA | tags::COPY_DONE | tags::COPY_FAIL => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected message type 0x{other:02x} on the console"
                    )))
                }
            }
            conn.read_buf.advance(frame_len);
            if !out.is_empty() {
                conn.write_flush(&out).await?;
            }
        }
    }

    /// Runs every command of one simple Query; the first error stops the rest.
    async fn query(&mut self, sql: &str, out: &mut BytesMut) {
        let commands = match commands::parse(sql) {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(m::CONSOLE_COMMANDS_TOTAL, "command" => "unknown").increment(1);
                let error = ClientError::from(e);
                self.audit_statement(sql, 0, None, Some(&error), Instant::now());
                error_response(out, &error);
                return;
            }
        };
        if commands.is_empty() {
            crate::console::render::empty_query(out);
            return;
        }
        for (index, command) in commands.iter().enumerate() {
            let started = Instant::now();
            self.commands += 1;
            metrics::counter!(m::CONSOLE_COMMANDS_TOTAL, "command" => command.label()).increment(1);
            let result = self.execute(command, out).await;
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            match result {
                Ok(()) => {
                    render::command_complete(out, command.tag());
                    self.audit_statement(sql, index, Some(command.tag()), None, started);
                }
                Err(e) => {
                    let error = ClientError::from(e);
                    self.audit_statement(sql, index, None, Some(&error), started);
                    error_response(out, &error);
                    return;
                }
            }
        }
    }

    /// Runs one command, appending its result set or notices (not its CommandComplete).
    async fn execute(&mut self, command: &Command, out: &mut BytesMut) -> Result<(), ConsoleError> {
        let shared = self.shared;
        let registry = &shared.sessions;
        info!(command = command.label(), "console command");
        match command {
            Command::Show(what) => {
                // The latest snapshot: SHOW after RELOAD shows the reloaded config.
                let rt = self.shared.runtime();
                let rs = match what {
                    Show::Tenants => show::tenants(shared, &rt),
                    Show::Pools => show::pools(shared, &rt),
                    Show::Clients => show::clients(shared),
                    Show::Servers => show::servers(shared),
                    Show::Stats => show::stats(shared),
                    Show::Config => show::config(&rt.config, shared.config_path().as_deref()),
                    Show::Help => show::help(),
                };
                rs.encode(out);
            }
            Command::Reload => {
                let Some(path) = shared.config_path() else {
                    return Err(ConsoleError::Reload(
                        "pgtenant was not started with `serve --config`: there is no file to re-read"
                            .into(),
                    ));
                };
                shared
                    .reload_file(&path)
                    .await
                    .map_err(|e| ConsoleError::Reload(without_snippets(&format!("{e:#}"))))?;
                render::notice(
                    out,
                    &format!(
                        "config reloaded from {}; new sessions use it",
                        path.display()
                    ),
                );
            }
            Command::Pause(tenant) => {
                let n = registry.pause(tenant.as_deref());
                render::notice(
                    out,
                    &format!("{}: {n} open session(s) now paused", scope(tenant)),
                );
            }
            Command::Resume(tenant) => {
                registry.resume(tenant.as_deref());
                render::notice(out, &format!("{}: resumed", scope(tenant)));
            }
            Command::Kill(tenant) => {
                let reason = format!("tenant {tenant} killed by administrator");
                let n = registry.kill_tenant(tenant, &reason);
                warn!(tenant = %tenant, sessions = n, "KILL TENANT from the console");
                render::notice(out, &format!("tenant {tenant}: {n} session(s) killed"));
            }
            Command::Suspend(tenant) => {
                let reason = format!("tenant {tenant} suspended by administrator");
                let n = registry.suspend_tenant(tenant, &reason);
                warn!(tenant = %tenant, sessions = n, "SUSPEND TENANT from the console");
                render::notice(
                    out,
                    &format!("tenant {tenant}: {n} session(s) killed; new sessions refused until RESUME {tenant}"),
                );
            }
            Command::Shutdown => {
                warn!("SHUTDOWN from the console");
                shared.request_stop();
                render::notice(
                    out,
                    "pgtenant is shutting down; sessions end at their next idle point",
                );
            }
        }
        Ok(())
    }

    fn audit_statement(
        &self,
        sql: &str,
        index: u32,
        tag: Option<&str>,
        error: Option<&ClientError>,
        started: Instant,
    ) {
        let (Some(a), true) = (self.audit, self.statements) else {
            return;
        };
        a.statement(CompletedStatement {
            sql: Arc::from(sql),
            index,
            command_tag: tag.map(str::to_string),
            sqlstate: error.map(|e| e.sqlstate().code().to_string()),
            duration: started.elapsed(),
        });
    }
}

fn scope(tenant: &Option<String>) -> String {
    match tenant {
        Some(t) => format!("tenant {t}"),
        None => "all tenants".into(),
    }
}

fn error_response(out: &mut BytesMut, error: &ClientError) {
    let wire = error.to_wire();
    messages::error_response(out, Severity::Error, &wire.code, &wire.message);
}

/// A config error without the quoted lines of the file a TOML parse error shows (a line may
/// hold a secret).
fn without_snippets(message: &str) -> String {
    // A snippet line is `|`, `| ...` or `<line number> | ...`.
    let is_snippet = |line: &str| match line.split_once('|') {
        Some((before, _)) => before.trim().chars().all(|c| c.is_ascii_digit()),
        None => false,
    };
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_snippet(l))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(value: Option<&str>) -> ConsoleConfig {
        ConsoleConfig {
            admin_value: value.map(str::to_string),
            ..ConsoleConfig::default()
        }
    }

    #[test]
    fn admin_claim_rules() {
        let plain = cfg(None);
        assert!(is_admin(&plain, &json!({"pgtenant_admin": true})));
        assert!(!is_admin(&plain, &json!({"pgtenant_admin": false})));
        assert!(!is_admin(&plain, &json!({"pgtenant_admin": "true"})));
        assert!(!is_admin(&plain, &json!({})));
        let valued = cfg(Some("ops"));
        assert!(is_admin(&valued, &json!({"pgtenant_admin": "ops"})));
        assert!(is_admin(&valued, &json!({"pgtenant_admin": "read ops"})));
        assert!(is_admin(&valued, &json!({"pgtenant_admin": ["x", "ops"]})));
        assert!(!is_admin(&valued, &json!({"pgtenant_admin": "opsx"})));
        assert!(!is_admin(&valued, &json!({"pgtenant_admin": true})));
        let nested = ConsoleConfig {
            admin_claim: "app.roles".into(),
            admin_value: Some("admin".into()),
            ..ConsoleConfig::default()
        };
        assert!(is_admin(&nested, &json!({"app": {"roles": ["admin"]}})));
    }

    #[test]
    fn toml_snippets_are_dropped() {
        let msg = "invalid config: TOML parse error at line 3, column 10\n  |\n3 | secret = \"abc\n  |          ^\ninvalid basic string\n";
        let clean = without_snippets(msg);
        assert!(!clean.contains("abc"), "{clean}");
        assert!(clean.contains("line 3, column 10"), "{clean}");
        assert!(clean.contains("invalid basic string"), "{clean}");
    }
}
