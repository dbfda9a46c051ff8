//! A directory row → where the session goes: a configured upstream by name, or a dedicated
//! database the row describes, served by a pool made on first use from the template upstream.

use std::sync::Arc;

use crate::config::{Config, UpstreamKind};
use crate::pool::{Pools, UpstreamTarget};

use super::{DirRow, DirectoryConfig, Inner, Resolved, Route};

/// Resolves `row` against the running `config`. The error is a reason for the operator; it
/// names upstreams, hosts and credential references, never a password.
pub(super) fn resolve_row(
    inner: &Inner,
    row: &DirRow,
    config: &Config,
) -> Result<Resolved, String> {
    match (&row.upstream, &row.database) {
        (Some(_), Some(_)) => Err("the row names both an upstream and a database".into()),
        (Some(name), None) => {
            let route = Route::for_upstream(config, name)
                .ok_or_else(|| format!("the row names unknown upstream {name:?}"))?;
            Ok(Resolved { route, pools: None })
        }
        (None, Some(_)) => {
            let (name, pools) = described_pool(inner, row, config)?;
            Ok(Resolved {
                route: Route {
                    upstream: name,
                    kind: UpstreamKind::Dedicated,
                    tenant_setting: None,
                },
                pools: Some(pools),
            })
        }
        (None, None) => Err("the row names neither an upstream nor a database".into()),
    }
}

/// Where a described database is, and with which login. Fields the row leaves NULL come
/// from the template upstream.
pub(super) fn described_target(
    directory: &DirectoryConfig,
    row: &DirRow,
    config: &Config,
) -> Result<UpstreamTarget, String> {
    let template_name = directory
        .template
        .as_deref()
        .ok_or("the row describes a database but directory.template is not set")?;
    let template = config
        .upstreams
        .get(template_name)
        .ok_or_else(|| format!("directory.template names unknown upstream {template_name:?}"))?;
    let mut target = UpstreamTarget::from_url(&template.url)
        .map_err(|e| format!("upstreams.{template_name}.url: {e}"))?;
    if let Some(host) = &row.host {
        if host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
        {
            return Err(format!(
                "the row's host {host:?} is not a host name or address"
            ));
        }
        target.host = host.trim_matches(['[', ']']).to_owned();
    }
    if let Some(port) = row.port {
        target.port = port;
    }
    target.database = row.database.clone().unwrap_or_default();
    if let Some(reference) = &row.credentials {
        let creds = directory
            .credentials
            .get(reference)
            .ok_or_else(|| format!("the row names unknown credentials {reference:?} (no [directory.credentials.{reference}])"))?;
        target.user = creds.user.clone();
        target.password = creds.password.clone();
    }
    Ok(target)
}

/// `dir:<host>:<port>/<database>`, plus `#<credentials>` when the row names a login: stable,
/// and free of secrets, for metric labels, audit rows and logs.
pub(super) fn pool_name(target: &UpstreamTarget, credentials: Option<&str>) -> String {
    let mut name = format!("dir:{}/{}", target.addr(), target.database);
    if let Some(reference) = credentials {
        name.push('#');
        name.push_str(reference);
    }
    name
}

fn described_pool(
    inner: &Inner,
    row: &DirRow,
    config: &Config,
) -> Result<(Arc<str>, Arc<Pools>), String> {
    let target = described_target(&inner.config, row, config)?;
    let name = pool_name(&target, row.credentials.as_deref());
    let mut pools = inner.pools.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = pools.get(&name) {
        return Ok((Arc::from(name.as_str()), existing.clone()));
    }
    // Checked by `validate`; `described_target` found it.
    let template_name = inner.config.template.as_deref().unwrap_or_default();
    let template = &config.upstreams[template_name];
    let built = Pools::single(&name, template, target).map_err(|e| e.to_string())?;
    let built = Arc::new(built);
    pools.insert(name.clone(), built.clone());
    tracing::info!(upstream = %name, "pool created for a tenant directory database");
    Ok((Arc::from(name.as_str()), built))
}
