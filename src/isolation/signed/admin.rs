//! Bodies of `pgtenant rls install` and `pgtenant rls rotate-key`: run the install script,
//! create, rotate and retire keys, over an admin connection (tokio-postgres).
//!
//! The admin URL is connected WITHOUT TLS: the new key travels to the server as a bind
//! parameter on it. Use a unix socket or a trusted network, or build a TLS
//! `tokio_postgres::Client` yourself and call the `*_on` variants.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;
use tokio_postgres::{Client, NoTls};

use super::sql::{self, check_names, ident};
use super::{hex_encode, now_unix, MIN_KEY_BYTES};

/// A key created by `install` or `rotate_key`. Shown to the operator once. `Debug`
/// hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKey {
    pub key_id: String,
    /// 64 lowercase hex characters (32 bytes).
    pub key_hex: String,
    /// Where it was written (`<key_id>:<hex>`, mode 0600), if a key file was asked for.
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key_id", &self.key_id)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// What `install` did.
#[derive(Debug, Clone)]
pub struct InstallReport {
    pub schema: String,
    pub owner_role: String,
    pub pool_role: String,
    /// The key created by this run; `None` when valid keys existed already (kept as is).
    pub new_key: Option<NewKey>,
    /// Ids of the keys that `enter` accepts now, newest first.
    pub active_keys: Vec<String>,
    /// The policy form to use on every tenant table (for `<table>` and `tenant_id`).
    pub policy_example: String,
}

/// Connects to `admin_url` (no TLS) and runs [`install_on`].
pub async fn install(
    admin_url: &str,
    schema: &str,
    owner_role: &str,
    pool_role: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<InstallReport> {
    let mut client = connect(admin_url).await?;
    install_on(&mut client, schema, owner_role, pool_role, key_file).await
}

/// Runs the idempotent install script, then creates a first key if no valid key exists.
/// `key_file`, when given, receives the new key (created with mode 0600; an existing file
/// is an error, checked before anything changes). Running it again changes nothing but
/// re-asserts ownership, grants and function bodies.
pub async fn install_on(
    client: &mut Client,
    schema: &str,
    owner_role: &str,
    pool_role: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<InstallReport> {
    check_names(schema, owner_role, pool_role)?;
    refuse_existing(key_file)?;
    let script = sql::install_sql(schema, owner_role, pool_role)?;
    if let Err(e) = client.batch_execute(&script).await {
        // The script's own BEGIN is still open (aborted) after a failed statement.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e).context("running the signed-context install script");
    }

    let tx = client.transaction().await?;
    lock_keys(&tx, schema).await?;
    let new_key = if active_keys(&tx, schema).await?.is_empty() {
        Some(insert_key(&tx, schema, key_file).await?)
    } else {
        None
    };
    commit_or_remove(tx, new_key.as_ref()).await?;
    let active = active_keys(client, schema).await?;
    Ok(InstallReport {
        schema: schema.to_owned(),
        owner_role: owner_role.to_owned(),
        pool_role: pool_role.to_owned(),
        new_key,
        active_keys: active,
        policy_example: sql::policy_sql(schema, "my_table", "tenant_id")?,
    })
}

/// Connects to `admin_url` (no TLS) and runs [`rotate_key_on`]. Returns (key id, key hex).
pub async fn rotate_key(
    admin_url: &str,
    schema: &str,
    retire_older: bool,
    key_file: Option<&Path>,
) -> anyhow::Result<(String, String)> {
    let mut client = connect(admin_url).await?;
    let key = rotate_key_on(&mut client, schema, retire_older, key_file).await?;
    Ok((key.key_id, key.key_hex))
}

/// Adds a new random key. With `retire_older`, every other valid key except the newest
/// previous one is retired: two keys stay valid (the new one, and the one the proxies
/// may still be signing with). Switch the proxies to the new key before the next rotation.
pub async fn rotate_key_on(
    client: &mut Client,
    schema: &str,
    retire_older: bool,
    key_file: Option<&Path>,
) -> anyhow::Result<NewKey> {
    ident("schema", schema)?;
    refuse_existing(key_file)?;
    let tx = client.transaction().await?;
    lock_keys(&tx, schema).await?;
    let key = insert_key(&tx, schema, key_file).await?;
    if retire_older {
        tx.execute(
            &format!(
                "UPDATE {schema}.context_keys SET retired_at = now()
                 WHERE retired_at IS NULL AND key_id <> $1
                   AND key_id NOT IN (
                       SELECT key_id FROM {schema}.context_keys
                       WHERE retired_at IS NULL AND key_id <> $1
                       ORDER BY created_at DESC, key_id DESC LIMIT 1)"
            ),
            &[&key.key_id],
        )
        .await
        .context("retiring older keys")?;
    }
    commit_or_remove(tx, Some(&key)).await?;
    Ok(key)
}

/// Retires one key now: `enter` refuses proofs signed with it from then on.
pub async fn retire_key(client: &Client, schema: &str, key_id: &str) -> anyhow::Result<()> {
    ident("schema", schema)?;
    let n = client
        .execute(
            &format!(
                "UPDATE {schema}.context_keys SET retired_at = now()
                 WHERE key_id = $1 AND (retired_at IS NULL OR retired_at > now())"
            ),
            &[&key_id],
        )
        .await?;
    if n == 0 {
        anyhow::bail!("no valid key {key_id:?} in {schema}.context_keys");
    }
    Ok(())
}

async fn connect(admin_url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(admin_url, NoTls)
        .await
        .context("admin connection failed")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "admin connection closed");
        }
    });
    Ok(client)
}

/// Serializes key changes (install's "first key" check, rotations) per schema.
async fn lock_keys(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> anyhow::Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgtenant.context_keys.' || $1::text))",
        &[&schema],
    )
    .await?;
    Ok(())
}

async fn active_keys(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            &format!(
                "SELECT key_id FROM {schema}.context_keys
                 WHERE retired_at IS NULL OR retired_at > now()
                 ORDER BY created_at DESC, key_id DESC"
            ),
            &[],
        )
        .await
        .context("reading the key table")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Generates and inserts a key (inside the caller's transaction), then writes the key file.
async fn insert_key(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<NewKey> {
    let mut secret = [0u8; MIN_KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let mut suffix = [0u8; 2];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let key_id = format!("k{}-{}", now_unix(), hex_encode(&suffix));
    tx.execute(
        &format!("INSERT INTO {schema}.context_keys (key_id, secret) VALUES ($1, $2)"),
        &[&key_id, &&secret[..]],
    )
    .await
    .context("inserting the new key")?;
    let key_hex = hex_encode(&secret);
    if let Some(path) = key_file {
        write_key_file(path, &key_id, &key_hex)?;
    }
    Ok(NewKey {
        key_id,
        key_hex,
        key_file: key_file.map(Path::to_owned),
    })
}

/// Commits; if the commit fails, removes the key file just written (its key never existed).
async fn commit_or_remove(
    tx: tokio_postgres::Transaction<'_>,
    key: Option<&NewKey>,
) -> anyhow::Result<()> {
    if let Err(e) = tx.commit().await {
        if let Some(path) = key.and_then(|k| k.key_file.as_deref()) {
            let _ = std::fs::remove_file(path);
        }
        return Err(e).context("committing the key");
    }
    Ok(())
}

fn refuse_existing(key_file: Option<&Path>) -> anyhow::Result<()> {
    if let Some(path) = key_file {
        if path.exists() {
            anyhow::bail!(
                "key file {} exists already; choose a new path",
                path.display()
            );
        }
    }
    Ok(())
}

fn write_key_file(path: &Path, key_id: &str, key_hex: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    f.write_all(format!("{key_id}:{key_hex}\n").as_bytes())
        .with_context(|| format!("cannot write key file {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}
