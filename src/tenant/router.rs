//! Static tenant → upstream map from `[tenants]`, with an optional default upstream.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, UpstreamKind};

use super::TenantId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("tenant \"{0}\" is not configured on this proxy")]
    UnknownTenant(String),
}

/// Where a tenant's session goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: Arc<str>,
    pub kind: UpstreamKind,
    /// The setting that carries the tenant (shared upstreams only).
    pub tenant_setting: Option<Arc<str>>,
}

impl Route {
    /// The route to the configured upstream `name`, if there is one.
    pub fn for_upstream(cfg: &Config, name: &str) -> Option<Route> {
        let up = cfg.upstreams.get(name)?;
        Some(Route {
            upstream: Arc::from(name),
            kind: up.kind,
            tenant_setting: (up.kind == UpstreamKind::Shared)
                .then(|| Arc::from(up.tenant_setting.as_str())),
        })
    }
}

#[derive(Debug)]
pub struct Router {
    explicit: HashMap<String, Route>,
    default: Option<Route>,
}

impl Router {
    pub fn from_config(cfg: &Config) -> Router {
        let route_for = |name: &str| {
            let up = &cfg.upstreams[name];
            Route {
                upstream: Arc::from(name),
                kind: up.kind,
                tenant_setting: (up.kind == UpstreamKind::Shared)
                    .then(|| Arc::from(up.tenant_setting.as_str())),
            }
        };
        Router {
            explicit: cfg
                .tenants
                .map
                .iter()
                .map(|(t, up)| (t.clone(), route_for(up)))
                .collect(),
            default: cfg.tenants.default.as_deref().map(route_for),
        }
    }

    /// The route for a verified tenant. Unknown tenants are refused unless a default exists.
    pub fn route(&self, tenant: &TenantId) -> Result<Route, RouteError> {
        self.explicit
            .get(tenant.as_str())
            .or(self.default.as_ref())
            .cloned()
            .ok_or_else(|| RouteError::UnknownTenant(tenant.as_str().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(default: bool) -> Config {
        let text = format!(
            r#"
[listen]
[jwt]
secret = "0123456789abcdef0123456789abcdef"
[upstreams.shared]
kind = "shared"
url = "postgres://u:p@127.0.0.1:5432/saas"
[upstreams.acme]
kind = "dedicated"
url = "postgres://u:p@127.0.0.1:5432/acme_db"
[tenants]
{}
acme = "acme"
"#,
            if default { "default = \"shared\"" } else { "" }
        );
        Config::parse(&text).unwrap()
    }

    #[test]
    fn explicit_then_default_then_refused() {
        let r = Router::from_config(&cfg(true));
        let acme = r.route(&TenantId::new_validated("acme")).unwrap();
        assert_eq!(&*acme.upstream, "acme");
        assert_eq!(acme.kind, UpstreamKind::Dedicated);
        let other = r.route(&TenantId::new_validated("medcorp")).unwrap();
        assert_eq!(&*other.upstream, "shared");
        assert_eq!(
            other.tenant_setting.as_deref(),
            Some("app.current_tenant_id")
        );

        let strict = Router::from_config(&cfg(false));
        assert_eq!(
            strict
                .route(&TenantId::new_validated("medcorp"))
                .unwrap_err(),
            RouteError::UnknownTenant("medcorp".into())
        );
    }
}
