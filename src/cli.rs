//! Command line: `serve`, `token`, `check-config`, `demo`, `doctor`, `rls`, `audit`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "pgtenant",
    version,
    about = "Tenant-aware PostgreSQL proxy: JWT passwords, per-tenant routing, RLS-pinned pools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        #[arg(
            long,
            short,
            env = "PGTENANT_CONFIG",
            default_value = "config/pgtenant.toml"
        )]
        config: PathBuf,
    },
    /// Print an HS256 token for development and tests.
    Token(TokenArgs),
    /// Parse and validate a config file, load its keys, and exit.
    CheckConfig {
        #[arg(
            long,
            short,
            env = "PGTENANT_CONFIG",
            default_value = "config/pgtenant.toml"
        )]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL with demo tenants and the proxy in front of it.
    Demo(DemoArgs),
    /// Inspect every shared upstream for isolation misconfigurations; exit 1 on fatal findings.
    Doctor(DoctorArgs),
    /// The signed tenant context (`context = "signed"`): print, install, rotate keys.
    #[command(subcommand)]
    Rls(RlsCommand),
    /// The audit table: print its DDL, or create it and its insert-only writer role.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the table DDL and the writer role's grants for review.
    Sql {
        /// Table name, optionally schema-qualified (unqualified means `public`).
        #[arg(long, default_value = "audit_tenant_access")]
        table: String,
        /// The role the proxy ships events as (INSERT only).
        #[arg(long, default_value = "pgtenant_audit")]
        writer_role: String,
    },
    /// Create (idempotently) the audit table and the writer role of `[audit] url`, and with
    /// `sink = "tenant"` of every dedicated upstream's `audit_url`.
    Init {
        #[arg(
            long,
            short,
            env = "PGTENANT_CONFIG",
            default_value = "config/pgtenant.toml"
        )]
        config: PathBuf,
        /// Superuser (or CREATEROLE + CREATEDB) connection, URL or key=value. Its host and
        /// credentials are used; the database is each audit URL's.
        #[arg(long, env = "PGTENANT_ADMIN_URL")]
        admin_url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RlsCommand {
    /// Print the install script for review.
    Sql(RlsNames),
    /// Install (idempotently) into a shared upstream's database; creates a first key if none.
    Install {
        #[command(flatten)]
        names: RlsNames,
        /// Superuser (or database owner) connection, URL or key=value. Not the pool role.
        #[arg(long, env = "PGTENANT_ADMIN_URL")]
        admin_url: String,
        /// Write a new key here as `<key_id>:<hex>` (mode 0600) for `signed_context.key_file`.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Add a new key; with --retire-older, retire all but the new and the previous one.
    RotateKey {
        #[arg(long, default_value = crate::isolation::signed::sql::DEFAULT_SCHEMA)]
        schema: String,
        #[arg(long, env = "PGTENANT_ADMIN_URL")]
        admin_url: String,
        #[arg(long)]
        retire_older: bool,
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RlsNames {
    #[arg(long, default_value = crate::isolation::signed::sql::DEFAULT_SCHEMA)]
    pub schema: String,
    #[arg(long, default_value = crate::isolation::signed::sql::DEFAULT_OWNER)]
    pub owner: String,
    /// The role the upstream's pool logs in as.
    #[arg(long, default_value = "pgtenant")]
    pub pool_role: String,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[arg(
        long,
        short,
        env = "PGTENANT_CONFIG",
        default_value = "config/pgtenant.toml"
    )]
    pub config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Column that holds the tenant id in tenant tables.
    #[arg(long, default_value = "tenant_id")]
    pub tenant_column: String,
    /// Schema of the signed tenant context, when `context = "signed"`.
    #[arg(long)]
    pub signed_schema: Option<String>,
    /// An admin connection (URL or key=value) for checks the pool role cannot see.
    #[arg(long, env = "PGTENANT_DOCTOR_ADMIN_URL")]
    pub admin_url: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// HMAC secret (prefer --secret-file: arguments show up in `ps`).
    #[arg(
        long,
        conflicts_with = "secret_file",
        required_unless_present = "secret_file"
    )]
    pub secret: Option<String>,
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[arg(long)]
    pub tenant: String,
    #[arg(long)]
    pub sub: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// Claim holding the tenant (dots for nesting).
    #[arg(long, default_value = "tenant_id")]
    pub tenant_claim: String,
    /// Extra claims, `key=value` (numbers and true/false are typed).
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, serde_json::Value)>,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// Admin (metrics) listen address.
    #[arg(long, default_value = "127.0.0.1:9930")]
    pub admin: String,
}

fn parse_claim(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or("expected key=value")?;
    let value = serde_json::from_str::<serde_json::Value>(v)
        .ok()
        .filter(|j| j.is_number() || j.is_boolean())
        .unwrap_or_else(|| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

pub fn read_secret(secret: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    match (secret, file) {
        (Some(s), _) => Ok(s.into_bytes()),
        (None, Some(f)) => {
            let mut bytes =
                std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            Ok(bytes)
        }
        (None, None) => anyhow::bail!("--secret or --secret-file is required"),
    }
}

pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = read_secret(args.secret, args.secret_file)?;
    let token = crate::auth::issue_hs256(
        &secret,
        &args.tenant_claim,
        &args.tenant,
        args.sub.as_deref(),
        args.ttl,
        &args.claims,
    )?;
    println!("{token}");
    Ok(())
}

pub fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    crate::tls::install_crypto_provider();
    let verifier = crate::auth::JwtVerifier::from_config(&config.jwt)?;
    // With jwks_url: one fetch, as `serve` would do at start.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(verifier.start())?;
    verifier.self_test()?;
    if let (Some(cert), Some(key)) = (&config.listen.tls_cert, &config.listen.tls_key) {
        crate::tls::acceptor(cert, key)?;
    }
    println!(
        "{}: ok ({} upstreams, {} tenants mapped, default upstream: {})",
        path.display(),
        config.upstreams.len(),
        config.tenants.map.len(),
        config
            .tenants
            .default
            .as_deref()
            .unwrap_or("none (unknown tenants refused)")
    );
    Ok(())
}

/// `pgtenant doctor`: returns whether any finding is fatal.
pub async fn doctor(args: DoctorArgs) -> anyhow::Result<bool> {
    use crate::isolation::doctor;
    let config = Config::load(&args.config)?;
    let opts = doctor::DoctorOptions {
        tenant_column: args.tenant_column,
        signed_schema: args.signed_schema,
        admin_url: args.admin_url,
    };
    let findings = doctor::check_config(&config, &opts).await?;
    if args.json {
        println!("{}", doctor::render_json(&findings));
    } else {
        print!("{}", doctor::render_text(&findings));
    }
    Ok(doctor::has_fatal(&findings))
}

/// `pgtenant rls ...`. Keys are printed once (or written to --key-file); they never go to logs.
pub async fn rls(cmd: RlsCommand) -> anyhow::Result<()> {
    use crate::isolation::signed;
    match cmd {
        RlsCommand::Sql(n) => {
            println!(
                "{}",
                signed::install_sql(&n.schema, &n.owner, &n.pool_role)?
            );
            println!("-- Policy form for every tenant table:");
            println!("{}", signed::policy_sql(&n.schema, "<table>", "tenant_id")?);
        }
        RlsCommand::Install {
            names: n,
            admin_url,
            key_file,
        } => {
            let report = signed::install(
                &admin_url,
                &n.schema,
                &n.owner,
                &n.pool_role,
                key_file.as_deref(),
            )
            .await?;
            println!(
                "installed schema {} (owner {}, pool role {})",
                report.schema, report.owner_role, report.pool_role
            );
            print_new_key(report.new_key.as_ref());
            println!("active keys: {}", report.active_keys.join(", "));
            println!("policy form:\n{}", report.policy_example);
        }
        RlsCommand::RotateKey {
            schema,
            admin_url,
            retire_older,
            key_file,
        } => {
            let (id, hex) =
                signed::rotate_key(&admin_url, &schema, retire_older, key_file.as_deref()).await?;
            match key_file {
                Some(f) => println!("new key {id} written to {}", f.display()),
                None => println!("new key {id}: {hex}"),
            }
        }
    }
    Ok(())
}

fn print_new_key(key: Option<&crate::isolation::signed::NewKey>) {
    match key {
        Some(k) => match &k.key_file {
            Some(f) => println!("new key {} written to {}", k.key_id, f.display()),
            None => println!(
                "new key {} (shown once; put it in signed_context.key via an environment variable): {}",
                k.key_id, k.key_hex
            ),
        },
        None => println!("valid keys exist; none created"),
    }
}

/// `pgtenant audit ...`. Prints names and what was done, never a password.
pub async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    use crate::audit::schema;
    match cmd {
        AuditCommand::Sql { table, writer_role } => {
            let table = schema::TableName::parse(&table).map_err(anyhow::Error::msg)?;
            schema::check_role(&writer_role)?;
            print!("{}", audit_sql(&table, &writer_role));
        }
        AuditCommand::Init { config, admin_url } => {
            let config = Config::load(&config)?;
            for (label, report) in schema::init_config(&config, &admin_url).await? {
                println!("{label}: {report}");
            }
        }
    }
    Ok(())
}

/// The script `pgtenant audit sql` prints: one transaction, reviewable and runnable with psql.
fn audit_sql(table: &crate::audit::schema::TableName, writer_role: &str) -> String {
    use crate::audit::schema::{grants_sql, quote_ident, table_sql};
    format!(
        "-- pgtenant audit table {table}; writer role {role} (create it first:\n\
         --   CREATE ROLE {role} LOGIN PASSWORD '...'; or use `pgtenant audit init`)\n\
         BEGIN;\n{}{}COMMIT;\n",
        table_sql(table),
        grants_sql(table, writer_role),
        role = quote_ident(writer_role),
    )
}
