//! Provisioning of the demo: roles, databases, tables, RLS and rows on a fresh [`TempPg`],
//! plus the dev JWT secret, a self-signed TLS certificate and a pgtenant config file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::distributions::{Alphanumeric, DistString};
use rand::RngCore;

use super::data::{
    DedicatedTenant, AUDIT_DATABASE, AUDIT_ROLE, AUDIT_TABLE, CLEARTEXT_ROLE, DEDICATED,
    INVOICES_PER_CUSTOMER, MD5_ROLE, POOL_ROLE, SHARED, SHARED_DATABASE, SHARED_OWNER,
    SHARED_UPSTREAM, TENANT_SETTING,
};
use crate::embedded_pg::TempPg;

/// File names written into the work dir.
const CONFIG_FILE: &str = "pgtenant.toml";
const JWT_SECRET_FILE: &str = "dev-jwt.key";
const TLS_CERT_FILE: &str = "dev-cert.pem";
const TLS_KEY_FILE: &str = "dev-key.pem";
/// Pool sizes in the written config.
const SHARED_POOL_SIZE: u32 = 10;
const DEDICATED_POOL_SIZE: u32 = 5;

/// What [`provision`] made. Everything in it is development-only: throwaway secrets.
#[derive(Debug, Clone)]
pub struct DemoEnv {
    pub workdir: PathBuf,
    /// `<workdir>/pgtenant.toml`; loads with `Config::load`.
    pub config_path: PathBuf,
    pub config_text: String,
    /// The HS256 secret: 96 hex characters, used as-is (the text's bytes are the key),
    /// exactly as the proxy reads `jwt.secret_file`.
    pub jwt_secret: String,
    /// Tenants routed to their own database: acme, techstart, bench.
    pub dedicated_tenants: Vec<String>,
    /// Tenants on the shared database `saas`: medcorp, globex, initech.
    pub shared_tenants: Vec<String>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The proxy's client listener, as written in the config.
    pub listen: SocketAddr,
    /// The admin (metrics) listener, as written in the config.
    pub admin: SocketAddr,
    /// Login role → password, for every role provisioned (tests connect directly with these).
    pub logins: BTreeMap<String, String>,
    /// Superuser conninfo (unix socket) of the audit database, for reading the audit table.
    pub audit_conninfo: String,
}

/// Creates roles, databases, tables, RLS and rows in `pg` (a fresh cluster: roles that
/// already exist are an error), and writes the dev JWT secret (48 random bytes, hex), a
/// self-signed TLS certificate and key for 127.0.0.1/localhost, and a pgtenant config
/// TOML into `workdir` (created if missing; secrets are mode 0600).
///
/// `listen` and `admin` are socket addresses for the config (`127.0.0.1:6432`). The written
/// config is checked with `Config::load` before returning.
pub async fn provision(
    pg: &TempPg,
    workdir: &Path,
    listen: &str,
    admin: &str,
) -> anyhow::Result<DemoEnv> {
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen address {listen:?} is not host:port"))?;
    let admin: SocketAddr = admin
        .parse()
        .with_context(|| format!("admin address {admin:?} is not host:port"))?;
    std::fs::create_dir_all(workdir)
        .with_context(|| format!("cannot create {}", workdir.display()))?;

    let logins = new_logins();
    let cluster = pg.admin_client("postgres").await?;
    create_roles(&cluster, &logins).await?;
    create_databases(&cluster).await?;
    for tenant in DEDICATED {
        if tenant.pgbench {
            init_pgbench(pg, tenant).await?;
        } else {
            seed_dedicated(pg, tenant).await?;
        }
    }
    seed_shared(pg).await?;
    init_audit(pg, &logins).await?;

    let jwt_secret = random_hex(48);
    let tls_cert = workdir.join(TLS_CERT_FILE);
    let tls_key = workdir.join(TLS_KEY_FILE);
    let secret_file = workdir.join(JWT_SECRET_FILE);
    write_private(&secret_file, &format!("{jwt_secret}\n"))?;
    write_tls(&tls_cert, &tls_key)?;

    let mut env = DemoEnv {
        workdir: workdir.to_owned(),
        config_path: workdir.join(CONFIG_FILE),
        config_text: String::new(),
        jwt_secret,
        dedicated_tenants: DEDICATED.iter().map(|d| d.tenant.to_owned()).collect(),
        shared_tenants: SHARED.iter().map(|s| s.tenant.to_owned()).collect(),
        tls_cert,
        tls_key,
        listen,
        admin,
        logins,
        audit_conninfo: admin_conninfo(pg, AUDIT_DATABASE),
    };
    env.config_text = render_config(pg, &env, &secret_file);
    write_private(&env.config_path, &env.config_text)?;
    crate::config::Config::load(&env.config_path)
        .context("the demo config written does not load (config format changed?)")?;
    Ok(env)
}

/// Ready-to-paste `psql`/`pgbench` commands for each tenant through the proxy on
/// 127.0.0.1:`proxy_port` (or the listen host if it is not a wildcard). `mint(tenant, user)`
/// returns a JWT for that tenant and user (`sub`); the caller chooses its lifetime.
pub fn instructions(env: &DemoEnv, proxy_port: u16, mint: &dyn Fn(&str, &str) -> String) -> String {
    let host = if env.listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        env.listen.ip().to_string()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pgtenant demo: a throwaway PostgreSQL, provisioned and proxied.\n"
    );
    let _ = writeln!(
        out,
        "  proxy    {host}:{proxy_port}  (TLS optional; self-signed cert {})",
        env.tls_cert.display()
    );
    let _ = writeln!(out, "  metrics  http://{}/metrics", env.admin);
    let _ = writeln!(out, "  config   {}", env.config_path.display());
    let _ = writeln!(
        out,
        "\nThe password is the tenant's JWT (HS256, secret in {}).",
        env.workdir.join(JWT_SECRET_FILE).display()
    );
    let conninfo =
        |user: &str, db: &str| format!("host={host} port={proxy_port} user={user} dbname={db}");

    let _ = writeln!(out, "\nDedicated tenants (a database each):");
    for d in DEDICATED {
        let token = mint(d.tenant, d.demo_user);
        if d.pgbench {
            let _ = writeln!(
                out,
                "  # {}: {}, pgbench tables (scale 1)",
                d.tenant, d.database
            );
            let _ = writeln!(
                out,
                "  PGPASSWORD='{token}' pgbench -n -S -c 4 -j 2 -T 10 -h {host} -p {proxy_port} -U {} {}",
                d.demo_user, d.database
            );
        } else {
            let _ = writeln!(out, "  # {}: {}", d.tenant, d.database);
            let _ = writeln!(
                out,
                "  PGPASSWORD='{token}' psql \"{}\" -c 'SELECT email, name FROM iam_user'",
                conninfo(d.demo_user, d.database)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nShared tenants (database {SHARED_DATABASE}, row-level security on {TENANT_SETTING}):"
    );
    for s in SHARED {
        let token = mint(s.tenant, s.demo_user);
        let _ = writeln!(
            out,
            "  # {}: sees only its own {} customers",
            s.tenant,
            s.customers.len()
        );
        let _ = writeln!(
            out,
            "  PGPASSWORD='{token}' psql \"{}\" -c 'SELECT tenant_id, name FROM customers'",
            conninfo(s.demo_user, SHARED_DATABASE)
        );
    }
    let _ = writeln!(
        out,
        "\nAudit trail (every session and statement above, written by pgtenant's insert-only role):"
    );
    let _ = writeln!(
        out,
        "  psql \"{}\" -c 'SELECT access_time, tenant_id, user_id, event, operation, table_name, success, sqlstate FROM {AUDIT_TABLE} ORDER BY access_time DESC LIMIT 20'",
        env.audit_conninfo
    );
    out
}

/// The superuser over the cluster's unix socket (`trust`), as a libpq conninfo.
fn admin_conninfo(pg: &TempPg, dbname: &str) -> String {
    format!(
        "host={} port={} user=postgres dbname={dbname}",
        pg.socket_dir.display(),
        pg.port
    )
}

/// The audit database, its table and the insert-only writer role, exactly as
/// `pgtenant audit init` makes them.
async fn init_audit(pg: &TempPg, logins: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let url = pg.tcp_url(AUDIT_ROLE, password(logins, AUDIT_ROLE)?, AUDIT_DATABASE);
    let table = crate::audit::schema::TableName::parse(AUDIT_TABLE).map_err(anyhow::Error::msg)?;
    crate::audit::schema::init(&admin_conninfo(pg, "postgres"), &url, &table)
        .await
        .context("creating the demo audit database")?;
    Ok(())
}

/// Alphanumeric passwords for every login role.
fn new_logins() -> BTreeMap<String, String> {
    let mut rng = rand::thread_rng();
    let mut roles: Vec<&str> = DEDICATED.iter().map(|d| d.role).collect();
    roles.extend([POOL_ROLE, MD5_ROLE, CLEARTEXT_ROLE, AUDIT_ROLE]);
    roles
        .into_iter()
        .map(|r| (r.to_owned(), Alphanumeric.sample_string(&mut rng, 24)))
        .collect()
}

fn password<'a>(logins: &'a BTreeMap<String, String>, role: &str) -> anyhow::Result<&'a str> {
    match logins.get(role) {
        Some(p) => Ok(p),
        None => bail!("no password generated for role {role}"),
    }
}

async fn create_roles(
    client: &tokio_postgres::Client,
    logins: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    // Shared-database roles carry no attribute beyond LOGIN: not superuser, no BYPASSRLS,
    // no CREATEDB/CREATEROLE, member of no roles (design/isolation.md, checklist 1).
    const PLAIN: &str = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS";
    let mut sql = format!("CREATE ROLE {SHARED_OWNER} NOLOGIN {PLAIN};\n");
    for d in DEDICATED {
        let pw = literal(password(logins, d.role)?);
        let _ = writeln!(sql, "CREATE ROLE {} LOGIN {PLAIN} PASSWORD {pw};", d.role);
    }
    for role in [POOL_ROLE, CLEARTEXT_ROLE] {
        let pw = literal(password(logins, role)?);
        let _ = writeln!(sql, "CREATE ROLE {role} LOGIN {PLAIN} PASSWORD {pw};");
    }
    // md5_user's verifier must be md5, or the `md5` hba method silently upgrades to SCRAM.
    let pw = literal(password(logins, MD5_ROLE)?);
    let _ = writeln!(
        sql,
        "SET password_encryption = 'md5';\n\
         CREATE ROLE {MD5_ROLE} LOGIN {PLAIN} PASSWORD {pw};\n\
         RESET password_encryption;"
    );
    client
        .batch_execute(&sql)
        .await
        .context("creating demo roles")
}

async fn create_databases(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let owners = DEDICATED
        .iter()
        .map(|d| (d.database, d.role))
        .chain([(SHARED_DATABASE, SHARED_OWNER)]);
    for (db, owner) in owners {
        // CREATE DATABASE cannot share a query string with other statements.
        client
            .batch_execute(&format!("CREATE DATABASE {db} OWNER {owner}"))
            .await
            .with_context(|| format!("creating database {db}"))?;
        // Only the owner (and whoever is granted CONNECT below) may connect; no TEMP.
        client
            .batch_execute(&format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
            .await?;
    }
    client
        .batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {SHARED_DATABASE} TO {POOL_ROLE}, {MD5_ROLE}, {CLEARTEXT_ROLE}"
        ))
        .await?;
    Ok(())
}

/// `iam_user` and `assets`, owned by the tenant's role, rows naming the tenant.
async fn seed_dedicated(pg: &TempPg, t: &DedicatedTenant) -> anyhow::Result<()> {
    let client = pg.admin_client(t.database).await?;
    client
        .batch_execute(&format!(
            "SET ROLE {role};
             CREATE TABLE iam_user (
                 id serial PRIMARY KEY,
                 email text NOT NULL UNIQUE,
                 name text NOT NULL
             );
             CREATE TABLE assets (
                 id serial PRIMARY KEY,
                 name text NOT NULL UNIQUE,
                 kind text NOT NULL
             );",
            role = t.role
        ))
        .await
        .with_context(|| format!("creating tables in {}", t.database))?;
    for (email, name) in t.users {
        client
            .execute(
                "INSERT INTO iam_user (email, name) VALUES ($1, $2)",
                &[email, name],
            )
            .await?;
    }
    for (name, kind) in t.assets {
        client
            .execute(
                "INSERT INTO assets (name, kind) VALUES ($1, $2)",
                &[name, kind],
            )
            .await?;
    }
    Ok(())
}

/// `pgbench -i -s 1` as the tenant's role, so `pgbench -S` works through the proxy.
async fn init_pgbench(pg: &TempPg, t: &DedicatedTenant) -> anyhow::Result<()> {
    let pgbench = pg.pgbench_path();
    if !pgbench.is_file() {
        bail!(
            "pgbench not found at {}: install postgresql-contrib",
            pgbench.display()
        );
    }
    let mut cmd = tokio::process::Command::new(&pgbench);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(["-i", "-s", "1", "-q", "-I", "dtGvp", "-h"])
        .arg(&pg.socket_dir)
        .args(["-p", &pg.port.to_string(), "-U", t.role, t.database])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run pgbench")?;
    if !out.status.success() {
        bail!(
            "pgbench -i on {} failed ({}): {}",
            t.database,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The shared database: tables owned by a NOLOGIN role, RLS enabled and forced, the pool
/// roles granted DML only.
async fn seed_shared(pg: &TempPg) -> anyhow::Result<()> {
    let client = pg.admin_client(SHARED_DATABASE).await?;
    let tenant = format!("current_setting('{TENANT_SETTING}', true)");
    let grantees = format!("{POOL_ROLE}, {MD5_ROLE}, {CLEARTEXT_ROLE}");
    client
        .batch_execute(&format!(
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             SET ROLE {SHARED_OWNER};

             -- As in DotMac's seed: NULL when no tenant is set. RESET leaves '', not NULL.
             CREATE FUNCTION current_tenant_id() RETURNS text
                 LANGUAGE sql STABLE PARALLEL SAFE
                 AS $$ SELECT NULLIF({tenant}, '') $$;

             CREATE TABLE customers (
                 id serial PRIMARY KEY,
                 tenant_id text NOT NULL CHECK (tenant_id <> ''),
                 name text NOT NULL,
                 email text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 -- Keys include the tenant: a duplicate never reveals another tenant's row.
                 UNIQUE (tenant_id, email),
                 UNIQUE (tenant_id, id)
             );
             CREATE INDEX customers_tenant_idx ON customers (tenant_id);

             CREATE TABLE invoices (
                 id serial PRIMARY KEY,
                 tenant_id text NOT NULL CHECK (tenant_id <> ''),
                 customer_id integer NOT NULL,
                 amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
                 status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid', 'void')),
                 issued_on date NOT NULL DEFAULT current_date,
                 -- An invoice can only point at a customer of the same tenant.
                 FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id)
             );
             CREATE INDEX invoices_tenant_idx ON invoices (tenant_id);

             ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
             ALTER TABLE customers FORCE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON customers
                 USING (tenant_id = {tenant}) WITH CHECK (tenant_id = {tenant});
             ALTER TABLE invoices ENABLE ROW LEVEL SECURITY;
             ALTER TABLE invoices FORCE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON invoices
                 USING (tenant_id = {tenant}) WITH CHECK (tenant_id = {tenant});

             GRANT SELECT, INSERT, UPDATE, DELETE ON customers, invoices TO {grantees};
             GRANT USAGE ON SEQUENCE customers_id_seq, invoices_id_seq TO {grantees};
             RESET ROLE;"
        ))
        .await
        .context("creating the shared schema")?;

    // Rows are inserted as the superuser, which RLS does not restrict.
    for s in SHARED {
        for (name, email) in s.customers {
            client
                .execute(
                    "INSERT INTO customers (tenant_id, name, email) VALUES ($1, $2, $3)",
                    &[&s.tenant, name, email],
                )
                .await?;
        }
    }
    let per_customer = i32::try_from(INVOICES_PER_CUSTOMER)?;
    client
        .execute(
            "INSERT INTO invoices (tenant_id, customer_id, amount_cents, status, issued_on)
             SELECT c.tenant_id, c.id, 10000 + 2500 * c.id + 700 * n,
                    CASE WHEN n = 1 THEN 'paid' ELSE 'open' END,
                    DATE '2024-01-01' + 30 * n + c.id
             FROM customers c CROSS JOIN generate_series(1, $1::int) AS n
             ORDER BY c.id, n",
            &[&per_customer],
        )
        .await
        .context("inserting invoices")?;
    Ok(())
}

fn render_config(pg: &TempPg, env: &DemoEnv, secret_file: &Path) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let p = |p: &Path| q(&p.to_string_lossy());
    let url = |role: &str, db: &str| {
        let pw = env.logins.get(role).map(String::as_str).unwrap_or_default();
        q(&pg.tcp_url(role, pw, db))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# pgtenant demo config, written by `pgtenant demo`. Development only: the JWT\n\
         # secret, TLS key and role passwords are throwaway.\n"
    );
    let _ = writeln!(s, "[listen]\naddr = {}", q(&env.listen.to_string()));
    let _ = writeln!(
        s,
        "tls_cert = {}\ntls_key = {}",
        p(&env.tls_cert),
        p(&env.tls_key)
    );
    let _ = writeln!(s, "tls = \"allow\"\n");
    let _ = writeln!(s, "[admin]\naddr = {}\n", q(&env.admin.to_string()));
    let _ = writeln!(
        s,
        "[jwt]\nalgorithms = [\"HS256\"]\nsecret_file = {}\ntenant_claim = \"tenant_id\"\nuser_claim = \"sub\"\n",
        p(secret_file)
    );
    let _ = writeln!(
        s,
        "[upstreams.{SHARED_UPSTREAM}]\nkind = \"shared\"\nurl = {}\ntenant_setting = {}\npool_size = {SHARED_POOL_SIZE}\n",
        url(POOL_ROLE, SHARED_DATABASE),
        q(TENANT_SETTING)
    );
    for d in DEDICATED {
        let _ = writeln!(
            s,
            "[upstreams.{}]\nkind = \"dedicated\"\nurl = {}\npool_size = {DEDICATED_POOL_SIZE}\n",
            d.tenant,
            url(d.role, d.database)
        );
    }
    let _ = writeln!(s, "[tenants]\ndefault = {}", q(SHARED_UPSTREAM));
    for d in DEDICATED {
        let _ = writeln!(s, "{} = {}", d.tenant, q(d.tenant));
    }
    let _ = writeln!(
        s,
        "\n[audit]\nurl = {}\ntable = {}\nlevel = \"statement\"\nspool_dir = {}\non_full = \"fail_closed\"",
        url(AUDIT_ROLE, AUDIT_DATABASE),
        q(AUDIT_TABLE),
        p(&env.workdir.join("audit-spool"))
    );
    s
}

/// A self-signed certificate for localhost and 127.0.0.1 (rcgen), key mode 0600.
fn write_tls(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified =
        rcgen::generate_simple_self_signed(names).context("generating the dev TLS certificate")?;
    write_private(key_path, &certified.key_pair.serialize_pem())?;
    std::fs::write(cert_path, certified.cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    buf.iter()
        .fold(String::with_capacity(bytes * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A SQL string literal (standard_conforming_strings is on).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
