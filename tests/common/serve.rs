//! The real binary: `pgtenant serve` as a child process, for what only a process can show
//! (`kill -9`, signals). Killed when dropped, so a failed assertion leaves nothing running.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// The demo config for a child process: its own ports, no start-up doctor, and no `[audit]`
/// (a test that wants one appends its own).
pub fn config_text(addr: SocketAddr, admin: SocketAddr) -> String {
    let env = super::env();
    let mut text = env.demo.config_text.clone();
    if let Some(at) = text.find("\n[audit]") {
        text.truncate(at);
    }
    text = text.replacen(
        &format!("addr = \"{}\"", env.demo.listen),
        &format!("addr = \"{addr}\""),
        1,
    );
    text = text.replacen(
        &format!("addr = \"{}\"", env.demo.admin),
        &format!("addr = \"{admin}\""),
        1,
    );
    text.push_str("\n[doctor]\non_start = \"off\"\n");
    text
}

/// A running `pgtenant serve --config <config>`; its stderr goes to `<config>.log`.
pub struct Serve {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Serve {
    /// Starts the binary and waits until it accepts connections on `addr` (30 s).
    pub async fn start(config: &Path, addr: SocketAddr, admin: SocketAddr) -> Serve {
        let log = config.with_extension("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .args(["serve", "--config"])
            .arg(config)
            .env("PGTENANT_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn pgtenant");
        let serve = Serve {
            child,
            addr,
            admin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "pgtenant did not start: {}",
                serve.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        serve
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal pgtenant");
    }

    /// `kill -9` and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        super::http_get(&format!("http://{}/metrics", self.admin))
            .await
            .1
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of a series' samples in Prometheus text (`name` or `name{labels}` as a prefix).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
