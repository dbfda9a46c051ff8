//! The behavioural check: as the pool role, in a READ ONLY transaction that is rolled back,
//! read one row of each tenant table with no tenant context, with an unknown tenant, and with
//! '' (what RESET and DISCARD ALL leave). Any row means a policy admits rows to a session that
//! is nobody's tenant, whatever the catalog text suggested.
//!
//! Cost: `SELECT 1 FROM t LIMIT 1` per table and state, under a 5 s statement timeout and a
//! 2 s lock timeout; without an index on the tenant column it scans the table. A probe that
//! errors or times out fails closed and is not reported.

use rand::RngCore;
use tokio_postgres::SimpleQueryMessage;

use super::catalog::RLS_PROBE_ROWS_VISIBLE;
use super::policy_text::literal;
use super::tables::TenantTable;
use super::{Ctx, DoctorError};

/// Per-statement bound for one probe.
const PROBE_TIMEOUT: &str = "5s";

/// A tenant context state to probe with.
#[derive(Debug, Clone)]
enum State {
    /// Nothing set in this session (`current_setting(.., true)` is NULL).
    Unset,
    /// A tenant id that cannot exist.
    Unknown(String),
    /// '': the state after RESET / DISCARD ALL.
    Empty,
}

impl State {
    fn describe(&self) -> String {
        match self {
            State::Unset => "no tenant context".to_owned(),
            State::Unknown(t) => format!("an unknown tenant ({t})"),
            State::Empty => "the tenant setting '' (as RESET leaves it)".to_owned(),
        }
    }
}

pub(super) async fn run(ctx: &mut Ctx<'_>, tables: &[&TenantTable]) -> Result<(), DoctorError> {
    let mut nonce = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut nonce);
    let unknown = format!(
        "pgtenant-doctor-{}",
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let states = [State::Unset, State::Unknown(unknown), State::Empty];
    for t in tables {
        for state in &states {
            if probe(ctx, t, state).await? {
                let message = format!(
                    "as {} with {}, SELECT FROM {} returned rows: a policy admits rows to a \
                     session that is no tenant (rows whose {} is '' or NULL, or a condition \
                     that does not depend on the tenant)",
                    ctx.role.name,
                    state.describe(),
                    t.name,
                    t.column
                );
                let fix = Some(format!(
                    "review the policies on {} (SELECT polname, pg_get_expr(polqual, polrelid) \
                     FROM pg_policy WHERE polrelid = '{}'::regclass) and rows with {} = ''",
                    t.name,
                    t.name.replace('\'', "''"),
                    t.column
                ));
                ctx.report(&RLS_PROBE_ROWS_VISIBLE, Some(t.name.clone()), message, fix);
                break;
            }
        }
    }
    Ok(())
}

/// Whether `t` shows a row in `state`. Errors of the probed statement (timeouts, policy
/// functions failing on '') count as "no rows"; only the transaction control can fail this.
async fn probe(ctx: &Ctx<'_>, t: &TenantTable, state: &State) -> Result<bool, DoctorError> {
    let set = match state {
        State::Unset => String::new(),
        State::Unknown(tenant) => set_local(ctx.tenant_setting, tenant),
        State::Empty => set_local(ctx.tenant_setting, ""),
    };
    let sql = format!(
        "BEGIN READ ONLY;
         SET LOCAL statement_timeout = '{PROBE_TIMEOUT}';
         {set}
         SELECT 1 FROM {} LIMIT 1",
        t.name
    );
    let seen = match ctx.pool.simple_query(&sql).await {
        Ok(messages) => last_statement_rows(&messages) > 0,
        Err(e) => {
            tracing::debug!(table = %t.name, error = %e, "doctor probe failed (fails closed)");
            false
        }
    };
    ctx.pool
        .batch_execute("ROLLBACK")
        .await
        .map_err(|source| DoctorError::Query {
            upstream: ctx.upstream.to_owned(),
            step: "probe rollback",
            source,
        })?;
    Ok(seen)
}

/// Rows returned by the last statement of a simple query (`set_config` returns one too).
fn last_statement_rows(messages: &[SimpleQueryMessage]) -> usize {
    let (mut current, mut last) = (0, 0);
    for m in messages {
        match m {
            SimpleQueryMessage::Row(_) => current += 1,
            SimpleQueryMessage::CommandComplete(_) => last = std::mem::take(&mut current),
            _ => {}
        }
    }
    last
}

fn set_local(setting: &str, value: &str) -> String {
    format!(
        "SELECT set_config({}, {}, true);",
        literal(setting),
        literal(value)
    )
}
