//! The session's `ClientFilter`: the SQL guard on shared upstreams, with a metric and a log
//! line per refused statement (never the statement text: it may hold another tenant's data).

use tracing::info;

use crate::isolation::guard::Guard;
use crate::metrics as m;

use super::audit_tap::{AuditGate, FilterChain, SessionAudit};
use super::relay::{ClientFilter, Refusal};
use crate::server::Runtime;

/// The filters every session of an upstream gets, in order: the audit gate (refuses while
/// the audit trail cannot take events, when configured), then the guard (shared
/// upstreams). Transaction mode adds its `FeatureFilter` after them.
pub struct SessionFilters<'a> {
    gate: Option<AuditGate<'a>>,
    guard: Option<GuardFilter<'a>>,
}

impl<'a> SessionFilters<'a> {
    pub fn new(
        rt: &'a Runtime,
        upstream: &'a str,
        tenant_label: &'a str,
        audit: Option<&'a SessionAudit>,
    ) -> Self {
        let guard = rt.guards.get(upstream).map(|guard| GuardFilter {
            guard,
            tenant_label,
            upstream,
            allow_function_call: rt
                .config
                .upstreams
                .get(upstream)
                .is_some_and(|u| u.allow_function_call),
            audit,
        });
        SessionFilters {
            gate: audit.map(|a| AuditGate { audit: &a.audit }),
            guard,
        }
    }

    /// The chain of the filters present (empty when none is).
    pub fn chain(&self) -> FilterChain<'_> {
        let mut filters: Vec<&dyn ClientFilter> = Vec::new();
        if let Some(gate) = &self.gate {
            filters.push(gate);
        }
        if let Some(guard) = &self.guard {
            filters.push(guard);
        }
        FilterChain { filters }
    }
}

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
