//! The session's `ClientFilter`: the SQL guard on shared upstreams, with a metric and a log
//! line per refused statement (never the statement text: it may hold another tenant's data).

use tracing::info;

use crate::isolation::guard::Guard;
use crate::metrics as m;

use super::audit_tap::SessionAudit;
use super::relay::{ClientFilter, Refusal};

pub struct GuardFilter<'a> {
    pub guard: &'a Guard,
    pub tenant_label: &'a str,
    pub upstream: &'a str,
    pub allow_function_call: bool,
    /// Every refusal is an audit event too.
    pub audit: Option<&'a SessionAudit>,
}

impl ClientFilter for GuardFilter<'_> {
    fn check_sql(&self, sql: &str) -> Option<Refusal> {
        let violation = self.guard.check(sql).err()?;
        let rule = violation.rule.label();
        metrics::counter!(m::ISOLATION_VIOLATIONS_TOTAL, "tenant" => self.tenant_label.to_string(), "rule" => rule)
            .increment(1);
        info!(
            tenant = self.tenant_label,
            upstream = self.upstream,
            rule,
            statement = violation.statement,
            "statement blocked by the isolation guard"
        );
        let refusal = Refusal {
            code: "42501",
            message: violation.rule.message().to_string(),
        };
        if let Some(audit) = self.audit {
            audit.blocked(sql, &refusal, rule);
        }
        Some(refusal)
    }

    fn check_function_call(&self) -> Option<Refusal> {
        if self.allow_function_call {
            return None;
        }
        metrics::counter!(m::ISOLATION_VIOLATIONS_TOTAL, "tenant" => self.tenant_label.to_string(), "rule" => "function_call")
            .increment(1);
        let refusal = Refusal {
            code: "0A000",
            message: "pgtenant: FunctionCall messages are not allowed on shared upstreams (allow_function_call = true permits them)".into(),
        };
        if let Some(audit) = self.audit {
            audit.blocked("", &refusal, "function_call");
        }
        Some(refusal)
    }
}
