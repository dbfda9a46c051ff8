//! Reports: text for people (grouped by upstream, worst first, with a summary line) and JSON
//! for scripts (a summary object and the findings with their stable check ids).

use std::fmt::Write as _;

use super::catalog::INSPECTED;
use super::{Finding, Severity};

/// Whether any finding is fatal: the upstream must not serve tenants as it is.
pub fn has_fatal(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Fatal)
}

/// Counts per severity: (fatal, warning, info).
fn counts(findings: &[Finding]) -> (usize, usize, usize) {
    let n = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    (n(Severity::Fatal), n(Severity::Warning), n(Severity::Info))
}

/// Upstream names in order of first appearance.
fn upstreams(findings: &[Finding]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for f in findings {
        if !names.contains(&f.upstream.as_str()) {
            names.push(&f.upstream);
        }
    }
    names
}

/// Human-readable report: per upstream, the `inspected` line, then fatal, warning and info
/// findings (each with its object, message and fix), then one summary line.
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    let names = upstreams(findings);
    for name in &names {
        let _ = writeln!(out, "upstream {name}");
        let mut group: Vec<&Finding> = findings.iter().filter(|f| f.upstream == *name).collect();
        // Stable: within a severity, the order the checks ran in.
        group.sort_by_key(|f| (f.check != INSPECTED.id, std::cmp::Reverse(f.severity)));
        for f in group {
            let label = match f.severity {
                Severity::Fatal => "FATAL",
                Severity::Warning => "WARNING",
                Severity::Info => "info",
            };
            let object = f
                .object
                .as_deref()
                .map(|o| format!(" [{o}]"))
                .unwrap_or_default();
            let _ = writeln!(out, "  {label:<7} {}{object}", f.check);
            let _ = writeln!(out, "          {}", f.message);
            if let Some(fix) = &f.fix {
                let _ = writeln!(out, "          fix: {fix}");
            }
        }
        let _ = writeln!(out);
    }
    let (fatal, warning, info) = counts(findings);
    let verdict = if fatal > 0 {
        "FAIL: do not serve tenants from an upstream with fatal findings"
    } else {
        "OK: no fatal findings"
    };
    let _ = writeln!(
        out,
        "summary: {} upstream(s), {fatal} fatal, {warning} warning(s), {info} info; {verdict}",
        names.len()
    );
    out
}

/// `{"summary": {"upstreams", "fatal", "warning", "info", "ok"}, "findings": [...]}`, each
/// finding as `{"upstream", "check", "severity", "object", "message", "fix"}`.
pub fn render_json(findings: &[Finding]) -> String {
    let (fatal, warning, info) = counts(findings);
    let report = serde_json::json!({
        "summary": {
            "upstreams": upstreams(findings).len(),
            "fatal": fatal,
            "warning": warning,
            "info": info,
            "ok": fatal == 0,
        },
        "findings": findings,
    });
    format!("{report:#}")
}
