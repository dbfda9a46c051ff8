//! The demo dataset, shaped after the seed systems: CitadelSecure's database per customer
//! (`acme_db`, `techstart_db`) and DotMac's shared database under row-level security.
//!
//! Tests assert against these tables, so row counts here are the single source of truth.

/// Session setting that carries the tenant on the shared database (as in DotMac).
pub const TENANT_SETTING: &str = "app.current_tenant_id";
/// The shared database.
pub const SHARED_DATABASE: &str = "saas";
/// The upstream name of the shared database in the written config.
pub const SHARED_UPSTREAM: &str = "shared";
/// NOLOGIN role owning the shared database, its tables and its policies.
pub const SHARED_OWNER: &str = "saas_owner";
/// The proxy's pool login role on the shared database (SCRAM).
pub const POOL_ROLE: &str = "pgtenant";
/// Same grants as the pool role; its password is stored as md5 and checked with `md5`.
pub const MD5_ROLE: &str = "md5_user";
/// Same grants as the pool role; checked with `password` (cleartext over the wire).
pub const CLEARTEXT_ROLE: &str = "clear_user";
/// The audit database, its table (the seeds' name) and the insert-only role that writes it.
pub const AUDIT_DATABASE: &str = "audit";
pub const AUDIT_TABLE: &str = "audit_tenant_access";
pub const AUDIT_ROLE: &str = "pgtenant_audit";
/// Every shared-database customer has this many invoices.
pub const INVOICES_PER_CUSTOMER: usize = 2;

/// A tenant with a database of its own, owned by its own login role.
#[derive(Debug, Clone, Copy)]
pub struct DedicatedTenant {
    pub tenant: &'static str,
    pub database: &'static str,
    /// Owner of the database and its tables; the upstream connects as this role.
    pub role: &'static str,
    /// The `sub` used in the demo's example tokens.
    pub demo_user: &'static str,
    /// `iam_user` rows: (email, name). Every row names the tenant.
    pub users: &'static [(&'static str, &'static str)],
    /// `assets` rows: (name, kind). Every name starts with the tenant.
    pub assets: &'static [(&'static str, &'static str)],
    /// Initialized with `pgbench -i -s 1` instead of `iam_user`/`assets`.
    pub pgbench: bool,
}

/// A tenant whose rows live in the shared database.
#[derive(Debug, Clone, Copy)]
pub struct SharedTenant {
    pub tenant: &'static str,
    pub demo_user: &'static str,
    /// `customers` rows: (name, email).
    pub customers: &'static [(&'static str, &'static str)],
}

pub const DEDICATED: &[DedicatedTenant] = &[
    DedicatedTenant {
        tenant: "acme",
        database: "acme_db",
        role: "acme_app",
        demo_user: "alice@acme.com",
        users: &[
            ("alice@acme.com", "Alice Anders (Acme)"),
            ("bob@acme.com", "Bob Brandt (Acme)"),
            ("carol@acme.com", "Carol Chen (Acme)"),
        ],
        assets: &[
            ("acme-web-01", "server"),
            ("acme-crm", "application"),
            ("acme-vpn-gateway", "network"),
            ("acme-customer-db", "database"),
        ],
        pgbench: false,
    },
    DedicatedTenant {
        tenant: "techstart",
        database: "techstart_db",
        role: "techstart_app",
        demo_user: "dana@techstart.io",
        users: &[
            ("dana@techstart.io", "Dana Diaz (TechStart)"),
            ("erik@techstart.io", "Erik Eriksen (TechStart)"),
        ],
        assets: &[
            ("techstart-api", "application"),
            ("techstart-k8s", "cluster"),
            ("techstart-laptops", "endpoint"),
        ],
        pgbench: false,
    },
    DedicatedTenant {
        tenant: "bench",
        database: "bench_db",
        role: "bench_app",
        demo_user: "bench",
        users: &[],
        assets: &[],
        pgbench: true,
    },
];

pub const SHARED: &[SharedTenant] = &[
    SharedTenant {
        tenant: "medcorp",
        demo_user: "dr.grey@medcorp.example",
        customers: &[
            ("Mercy General Hospital", "billing@mercygeneral.example"),
            ("Northside Clinic", "office@northside-clinic.example"),
            ("Lakeview Pharmacy", "accounts@lakeview-pharmacy.example"),
        ],
    },
    SharedTenant {
        tenant: "globex",
        demo_user: "hank@globex.example",
        customers: &[
            ("Globex Energy", "ap@globex-energy.example"),
            ("Scorpio Ventures", "finance@scorpio.example"),
        ],
    },
    SharedTenant {
        tenant: "initech",
        demo_user: "peter@initech.example",
        customers: &[
            ("Initrode", "billing@initrode.example"),
            ("Penetrode", "ap@penetrode.example"),
            ("Chotchkie's", "owner@chotchkies.example"),
            ("Intertrode", "finance@intertrode.example"),
        ],
    },
];

/// `pgbench -i -s 1` makes this many `pgbench_accounts` rows.
pub const PGBENCH_ACCOUNTS: i64 = 100_000;

pub fn dedicated(tenant: &str) -> Option<&'static DedicatedTenant> {
    DEDICATED.iter().find(|d| d.tenant == tenant)
}

pub fn shared(tenant: &str) -> Option<&'static SharedTenant> {
    SHARED.iter().find(|s| s.tenant == tenant)
}
