//! Command line: `serve`, `token`, `check-config`, `demo`.

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
