//! A throwaway local PostgreSQL cluster for `pgtenant demo` and for tests.
//!
//! `TempPg::start()` runs `initdb` into a fresh directory under the system temp dir, starts
//! the server with `pg_ctl -w` on a free loopback port, and removes everything on `stop()` or
//! `Drop`. PostgreSQL refuses to run as root, so when this process is root every server-side
//! tool (`initdb`, `pg_ctl`) runs as the `postgres` user (or `$PGTENANT_PG_USER`), through
//! `setuid`/`setgid` in the child, and the directory is chowned to that user. As a normal
//! user the tools run directly.
//!
//! Authentication: `local` is `trust` (the admin client uses the unix socket as `postgres`),
//! `host 127.0.0.1` is `scram-sha-256`, except role `clear_user` (`password`, cleartext) and
//! role `md5_user` (`md5`), so a pool's three password methods can be tested.
//!
//! Binaries are found through `$PGTENANT_PG_BINDIR`, then `pg_config --bindir`, then the
//! newest `/usr/lib/postgresql/*/bin`, then `PATH`.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{anyhow, bail, Context};

/// How many times `start()` picks a new port when the one it found was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl -w` waits for start or stop.
const PG_CTL_WAIT_SECS: &str = "60";
/// Server log inside the data directory.
const LOG_FILE: &str = "server.log";

/// Where the cluster stands. `Removed` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Server stopped by `stop_server`, data kept.
    ServerStopped,
    /// Server stopped and the directory removed by `stop`.
    Removed,
}

/// Who the server-side tools run as.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running throwaway cluster. Stopped (`-m fast`) and deleted on `stop()` or `Drop`.
///
/// `Sync`, so it can live in a `static` shared by the tests of one binary (see [`TempPg::shared`]).
#[derive(Debug)]
pub struct TempPg {
    /// TCP port on 127.0.0.1 (also the unix socket's port number).
    pub port: u16,
    /// Directory holding `initdb`, `pg_ctl`, `psql`, `pgbench`.
    pub bindir: PathBuf,
    /// The cluster's data directory (`PGDATA`).
    pub data_dir: PathBuf,
    /// Directory of the unix socket `.s.PGSQL.<port>`.
    pub socket_dir: PathBuf,
    /// Owner of `data_dir`/`socket_dir`; `None` when the tools run as this process's user.
    run_as: Option<RunAs>,
    /// The temp dir holding data and socket; taken by `stop()`.
    root: Mutex<Option<tempfile::TempDir>>,
    state: Mutex<State>,
}

impl TempPg {
    /// Creates and starts a cluster; returns once it accepts connections.
    ///
    /// Synchronous: it runs `initdb` and `pg_ctl` (about 1–3 s). From async code call
    /// [`TempPg::start_async`], or call this directly where blocking a worker is acceptable
    /// (tests). Errors say what is missing, e.g. "initdb not found: install postgresql".
    pub fn start() -> anyhow::Result<TempPg> {
        let bindir = find_bindir()?;
        let run_as = server_user()?;
        let root = tempfile::Builder::new()
            .prefix("pgtenant-pg-")
            .tempdir()
            .context("cannot create a temp dir for PostgreSQL")?;
        let data_dir = root.path().join("data");
        let socket_dir = root.path().join("sock");
        std::fs::create_dir(&socket_dir).context("cannot create socket dir")?;
        // The temp dir stays 0700: local connections are `trust`, so only the server user
        // (and root) may reach the socket.
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = run_as {
            chown_tree(root.path(), user)?;
        }
        let mut pg = TempPg {
            port: 0,
            bindir,
            data_dir,
            socket_dir,
            run_as,
            root: Mutex::new(Some(root)),
            state: Mutex::new(State::ServerStopped),
        };
        pg.initdb()?;
        let base_conf = std::fs::read_to_string(pg.data_dir.join("postgresql.conf"))
            .context("initdb wrote no postgresql.conf")?;
        pg.write_hba()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            pg.port = free_port()?;
            pg.write_conf(&base_conf)?;
            match pg.start_server() {
                Ok(()) => return Ok(pg),
                Err(e) if pg.port_was_taken() => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("no free port found")))
    }

    /// [`TempPg::start`] on a blocking thread.
    pub async fn start_async() -> anyhow::Result<TempPg> {
        tokio::task::spawn_blocking(TempPg::start)
            .await
            .context("TempPg::start panicked")?
    }

    /// One cluster per process, started on first use and removed when the process exits
    /// (by [`TempPg::stop_when_process_exits`]; a `static` is never dropped).
    pub fn shared() -> anyhow::Result<&'static TempPg> {
        static SHARED: OnceLock<Result<TempPg, String>> = OnceLock::new();
        let pg = SHARED.get_or_init(|| {
            let pg = TempPg::start().map_err(|e| format!("{e:#}"))?;
            pg.stop_when_process_exits();
            Ok(pg)
        });
        pg.as_ref()
            .map_err(|e| anyhow!("shared TempPg failed to start: {e}"))
    }

    /// Removes the cluster when this process exits, however it exits (panic, `exit`, SIGKILL).
    ///
    /// Spawns a detached `sh` watchdog in its own process group (so a terminal's Ctrl-C does
    /// not reach it) that polls this process with `kill -0`, then stops the server as
    /// `pg_ctl stop -m immediate` does (SIGQUIT to the postmaster named in `postmaster.pid`,
    /// which also works as root) and deletes the temp dir. Harmless if `stop()` ran first.
    pub fn stop_when_process_exits(&self) {
        let Some(root) = self.root_path() else { return };
        const SCRIPT: &str = r#"trap '' HUP INT TERM
while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
fi
rm -rf "$3""#;
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgtenant-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.data_dir)
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn the PostgreSQL watchdog; the cluster may outlive this process");
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`) and deletes the directory. Idempotent.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let state = *self.lock_state();
        let result = if state == State::Running {
            self.pg_ctl(&["stop", "-m", "fast"])
        } else {
            Ok(())
        };
        *self.lock_state() = State::Removed;
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(root) = root {
            if result.is_err() {
                self.kill_postmaster();
            }
            root.close()
                .context("cannot remove the PostgreSQL temp dir")?;
        }
        result
    }

    /// `pg_ctl restart -m <mode>` where mode is `smart`, `fast` or `immediate`; waits until
    /// the server accepts connections again. Existing connections are broken.
    pub fn restart(&self, mode: &str) -> anyhow::Result<()> {
        let mode = check_mode(mode)?;
        self.expect_state(State::Running, "restart")?;
        let log = self.log_path();
        self.pg_ctl(&["restart", "-m", mode, "-l", path_str(&log)?])
    }

    /// `pg_ctl stop -m <mode>`, keeping the data, for upstream-down tests.
    pub fn stop_server(&self, mode: &str) -> anyhow::Result<()> {
        let mode = check_mode(mode)?;
        self.expect_state(State::Running, "stop_server")?;
        self.pg_ctl(&["stop", "-m", mode])?;
        *self.lock_state() = State::ServerStopped;
        Ok(())
    }

    /// Starts the server again after `stop_server` (same port); waits until ready.
    pub fn start_server(&self) -> anyhow::Result<()> {
        self.expect_state(State::ServerStopped, "start_server")?;
        let log = self.log_path();
        self.pg_ctl(&["start", "-l", path_str(&log)?])?;
        *self.lock_state() = State::Running;
        Ok(())
    }

    /// Superuser connection (`postgres`, trust) over the unix socket. The connection task is
    /// spawned on the current tokio runtime.
    pub async fn admin_client(&self, dbname: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .application_name("pgtenant-admin")
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("admin connection to database {dbname:?} failed"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "TempPg admin connection closed");
            }
        });
        Ok(client)
    }

    /// `postgres://user:password@127.0.0.1:port/dbname` (TCP, so the `host` auth rules apply).
    /// The caller percent-encodes `user` and `password` if they need it.
    pub fn tcp_url(&self, user: &str, password: &str, dbname: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{dbname}",
            self.port
        )
    }

    pub fn psql_path(&self) -> PathBuf {
        self.bindir.join("psql")
    }

    pub fn pgbench_path(&self) -> PathBuf {
        self.bindir.join("pgbench")
    }

    /// The server log (stderr of the postmaster).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// The last `lines` lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the last start failed because another process holds our port.
    fn port_was_taken(&self) -> bool {
        let tail = self.log_tail(40);
        tail.contains("could not bind") || tail.contains("could not create any TCP/IP sockets")
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .server_tool("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .context("cannot run initdb")?;
        check_output("initdb", &out)
    }

    /// Our own pg_hba.conf: the per-role lines must precede the generic `host` line.
    fn write_hba(&self) -> anyhow::Result<()> {
        let hba = "\
# Written by pgtenant's TempPg.
# TYPE  DATABASE     USER        ADDRESS         METHOD
local   all          all                         trust
host    all          clear_user  127.0.0.1/32    password
host    all          md5_user    127.0.0.1/32    md5
host    all          all         127.0.0.1/32    scram-sha-256
host    all          all         ::1/128         scram-sha-256
local   replication  all                         trust
host    replication  all         127.0.0.1/32    scram-sha-256
";
        self.write_owned(&self.data_dir.join("pg_hba.conf"), hba)
    }

    fn write_conf(&self, base: &str) -> anyhow::Result<()> {
        let socket_dir = path_str(&self.socket_dir)?.replace('\'', "''");
        let conf = format!(
            "{base}
# Written by pgtenant's TempPg: a throwaway cluster, speed over durability.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 200
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
log_connections = off
log_line_prefix = '%m [%p] %q%u@%d '
",
            port = self.port,
        );
        self.write_owned(&self.data_dir.join("postgresql.conf"), &conf)
    }

    /// Writes a file in the data dir, owned by the server user.
    fn write_owned(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        let mut f = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        if let Some(user) = self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))?;
        }
        Ok(())
    }

    /// `pg_ctl -D data -w <args>`; on failure the error carries the server log's tail.
    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .server_tool("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", PG_CTL_WAIT_SECS])
            .args(args)
            .output()
            .context("cannot run pg_ctl")?;
        let verb = args.first().copied().unwrap_or("");
        check_output(&format!("pg_ctl {verb}"), &out).map_err(|e| {
            anyhow!(
                "{e:#}\n--- server log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(20)
            )
        })?;
        if matches!(verb, "start" | "restart") {
            *self.lock_state() = State::Running;
        }
        Ok(())
    }

    /// A command for a server-side tool: run as the server user when we are root, in the
    /// temp dir (the server user may not be able to enter our cwd), without PG* variables.
    fn server_tool(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(root) = self.root_path() {
            cmd.current_dir(root);
        }
        cmd.env("LC_ALL", "C").stdin(Stdio::null());
        if let Some(user) = self.run_as {
            // std drops supplementary groups (setgroups(0)) when changing uid as root.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    /// Last resort when `pg_ctl stop` failed: SIGQUIT, as `-m immediate` would send.
    fn kill_postmaster(&self) {
        let pid = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
    }

    fn root_path(&self) -> Option<PathBuf> {
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
        root.as_ref().map(|r| r.path().to_owned())
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect_state(&self, want: State, op: &str) -> anyhow::Result<()> {
        let state = *self.lock_state();
        if state != want {
            bail!("TempPg::{op}: server is {state:?}, expected {want:?}");
        }
        Ok(())
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %format!("{e:#}"), "stopping the throwaway PostgreSQL failed");
        }
    }
}

fn check_mode(mode: &str) -> anyhow::Result<&str> {
    match mode {
        "smart" | "fast" | "immediate" => Ok(mode),
        other => bail!("unknown shutdown mode {other:?}: use smart, fast or immediate"),
    }
}

fn check_output(what: &str, out: &Output) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", p.display()))
}

/// A port that was free on 127.0.0.1 a moment ago (the caller retries if it is taken since).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The user that runs the server: none (ourselves) unless we are root.
fn server_user() -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = std::env::var("PGTENANT_PG_USER").unwrap_or_else(|_| "postgres".into());
    let user = nix::unistd::User::from_name(&name)
        .with_context(|| format!("cannot look up user {name:?}"))?
        .ok_or_else(|| {
            anyhow!(
                "running as root, and PostgreSQL refuses to run as root: user {name:?} does not \
                 exist (create it, set PGTENANT_PG_USER, or run as a normal user)"
            )
        })?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

fn chown_tree(path: &Path, user: RunAs) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("cannot chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

/// The directory with `initdb` and `pg_ctl`.
fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PGTENANT_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_initdb(&dir) {
            return Ok(dir);
        }
        bail!(
            "PGTENANT_PG_BINDIR={} holds no initdb and pg_ctl",
            dir.display()
        );
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|d| has_initdb(d)) {
        return Ok(dir);
    }
    // Debian/Ubuntu keep the server binaries off PATH.
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Ok(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(dir) = on_path.into_iter().find(|d| has_initdb(d)) {
        return Ok(dir);
    }
    bail!(
        "initdb not found: install postgresql (Debian/Ubuntu: apt-get install postgresql), \
         or set PGTENANT_PG_BINDIR to the directory holding initdb and pg_ctl"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn start_restart_stop_and_clean_up() {
        let mut pg = TempPg::start_async().await.unwrap();
        let root = pg.root_path().unwrap();
        let one: i32 = pg
            .admin_client("postgres")
            .await
            .unwrap()
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(one, 1);
        assert!(pg.psql_path().is_file() && pg.pgbench_path().is_file());

        pg.restart("immediate").unwrap();
        pg.admin_client("postgres").await.unwrap();

        pg.stop_server("fast").unwrap();
        assert!(pg.admin_client("postgres").await.is_err());
        assert!(
            pg.restart("fast").is_err(),
            "restart needs a running server"
        );
        pg.start_server().unwrap();
        pg.admin_client("postgres").await.unwrap();
        assert!(pg.restart("sideways").is_err());

        pg.stop().unwrap();
        assert!(!root.exists(), "temp dir removed");
        pg.stop().unwrap();
    }

    const WATCHDOG_CHILD: &str = "PGTENANT_TEST_WATCHDOG_CHILD";

    /// Re-runs this test binary as a child that starts `TempPg::shared()`, SIGKILLs it, and
    /// expects the watchdog to stop the server and remove the directory.
    #[test]
    fn shared_cluster_is_removed_after_sigkill() {
        use std::io::BufRead;
        if std::env::var_os(WATCHDOG_CHILD).is_some() {
            let pg = TempPg::shared().unwrap();
            println!("ROOT={}", pg.root_path().unwrap().display());
            std::thread::sleep(std::time::Duration::from_secs(60));
            return;
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "embedded_pg::tests::shared_cluster_is_removed_after_sigkill",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(WATCHDOG_CHILD, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let root = stdout
            .lines()
            .map(Result::unwrap)
            // libtest prints "test <name> ... " on the same line first.
            .find_map(|l| l.split_once("ROOT=").map(|(_, dir)| PathBuf::from(dir)))
            .expect("child printed its cluster dir");
        let pid_file = std::fs::read_to_string(root.join("data/postmaster.pid")).unwrap();
        let postmaster: i32 = pid_file.lines().next().unwrap().parse().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();

        let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), None).is_ok();
        for _ in 0..100 {
            if !root.exists() && !alive() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "after 10 s: dir exists {}, postmaster alive {}",
            root.exists(),
            alive()
        );
    }
}
