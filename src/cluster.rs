//! Several replicas behind one TCP load balancer: the `[cluster]` config, the layout of the
//! cancel keys pgtenant hands out, and forwarding a CancelRequest to the replica that owns
//! its key (PgBouncer's peering, same idea).
//!
//! A client's CancelRequest travels on a new TCP connection, which the load balancer may
//! send to any replica. Each replica writes its id into the `pid` half of every key it
//! issues; a replica that receives a key with another id forwards the 16 bytes unchanged
//! except for a hop counter, so a misconfigured peer list cannot bounce a request forever.
//!
//! `pid` layout (31 bits, always positive):
//! ```text
//!  bit 31     30..29        28..21        20..0
//!  0 (sign)   hops left     replica id    random
//! ```
//! The secret stays 32 random bits; the key space a guesser faces is 53 bits.

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::cancel::ClientKey;
use crate::protocol::messages::cancel_request;

const RANDOM_BITS: u32 = 21;
const REPLICA_SHIFT: u32 = RANDOM_BITS;
const HOPS_SHIFT: u32 = RANDOM_BITS + 8;
const HOPS_MASK: i32 = 0b11 << HOPS_SHIFT;
/// Hops a freshly issued key may still travel: one, from the replica that received it to
/// the owner. The owner matches keys whatever their hop count.
const ISSUED_HOPS: i32 = 1;

/// `[cluster]`: this replica's id and where the others listen (like PgBouncer's
/// `peer_id` and `[peers]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's id, 0 to 255, encoded in every cancel key it hands out. Unique per
    /// replica. Not reloadable (keys already issued carry it).
    #[serde(default)]
    pub replica_id: u8,
    /// The replicas a CancelRequest may be forwarded to. The entry with this replica's own
    /// id, if any, is ignored, so every replica can share one list. Reloadable.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Connect + send deadline for a forwarded CancelRequest. Default 5s. Reloadable.
    #[serde(
        with = "humantime_serde",
        default = "ClusterConfig::default_forward_timeout"
    )]
    pub forward_timeout: Duration,
}

/// One replica in `[cluster] peers`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its `replica_id`.
    pub id: u8,
    /// Its client listener, `host:port`; a DNS name is resolved at each forward, so a
    /// StatefulSet pod's name works before the pod exists.
    pub addr: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica_id: 0,
            peers: Vec::new(),
            forward_timeout: Self::default_forward_timeout(),
        }
    }
}

impl ClusterConfig {
    fn default_forward_timeout() -> Duration {
        Duration::from_secs(5)
    }

    /// The client listener of replica `id`, unless that is this replica or not listed.
    pub fn peer_addr(&self, id: u8) -> Option<&str> {
        if id == self.replica_id {
            return None;
        }
        self.peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.addr.as_str())
    }

    /// Peer ids are unique and every address is `host:port`.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for peer in &self.peers {
            if !seen.insert(peer.id) {
                return Err(format!("cluster.peers: id {} is listed twice", peer.id));
            }
            let valid = peer.addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid {
                return Err(format!(
                    "cluster.peers: id {}: addr {:?} is not host:port",
                    peer.id, peer.addr
                ));
            }
        }
        Ok(())
    }
}

/// A fresh `pid` for a key issued by `replica`: replica id and hop budget in the high bits,
/// random below.
pub fn issue_pid(replica: u8, rng: &mut impl Rng) -> i32 {
    let random = rng.gen_range(0..1i32 << RANDOM_BITS);
    (ISSUED_HOPS << HOPS_SHIFT) | (i32::from(replica) << REPLICA_SHIFT) | random
}

/// The replica that issued `key`.
pub fn replica_of(key: ClientKey) -> u8 {
    ((key.pid >> REPLICA_SHIFT) & 0xff) as u8
}

/// Hops `key` may still be forwarded.
pub fn hops_left(key: ClientKey) -> i32 {
    (key.pid & HOPS_MASK) >> HOPS_SHIFT
}

/// `key` as its owner issued it (the hop count a forward changed set back), for lookup.
pub fn as_issued(key: ClientKey) -> ClientKey {
    ClientKey {
        pid: (key.pid & !HOPS_MASK) | (ISSUED_HOPS << HOPS_SHIFT),
        secret: key.secret,
    }
}

/// `key` with one hop used; `None` when it has none left.
pub fn after_hop(key: ClientKey) -> Option<ClientKey> {
    let hops = hops_left(key);
    (hops > 0).then(|| ClientKey {
        pid: (key.pid & !HOPS_MASK) | ((hops - 1) << HOPS_SHIFT),
        secret: key.secret,
    })
}

/// Sends `key` as a CancelRequest to the peer listening at `addr` (plain TCP, as a client
/// would), within `timeout`. The peer answers nothing; success means it was delivered.
pub async fn forward(addr: &str, key: ClientKey, timeout: Duration) -> std::io::Result<()> {
    let send = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&cancel_request(key.pid, key.secret)).await?;
        s.shutdown().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_replica_and_stay_positive() {
        let mut rng = rand::thread_rng();
        for replica in [0u8, 1, 7, 128, 255] {
            for _ in 0..200 {
                let key = ClientKey {
                    pid: issue_pid(replica, &mut rng),
                    secret: rng.gen(),
                };
                assert!(key.pid > 0, "pid {} for replica {replica}", key.pid);
                assert_eq!(replica_of(key), replica);
                assert_eq!(hops_left(key), ISSUED_HOPS);
                assert_eq!(as_issued(key), key);
            }
        }
    }

    #[test]
    fn a_forward_spends_the_hop_budget_and_keeps_the_key_recognisable() {
        let key = ClientKey {
            pid: issue_pid(3, &mut rand::thread_rng()),
            secret: -5,
        };
        let hopped = after_hop(key).expect("a fresh key may be forwarded once");
        assert_ne!(hopped, key);
        assert_eq!(replica_of(hopped), 3);
        assert_eq!(hopped.secret, key.secret);
        assert_eq!(as_issued(hopped), key, "the owner still finds it");
        assert_eq!(after_hop(hopped), None, "no second forward");
    }

    #[test]
    fn peers_skip_self_and_are_validated() {
        let text = r#"
            replica_id = 1
            peers = [{ id = 0, addr = "a:6432" }, { id = 1, addr = "b:6432" }]
        "#;
        let c: ClusterConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.peer_addr(0), Some("a:6432"));
        assert_eq!(c.peer_addr(1), None, "never to itself");
        assert_eq!(c.peer_addr(2), None);
        assert_eq!(c.forward_timeout, Duration::from_secs(5));

        let dup: ClusterConfig =
            toml::from_str(r#"peers = [{ id = 0, addr = "a:1" }, { id = 0, addr = "b:1" }]"#)
                .unwrap();
        assert!(dup.validate().unwrap_err().contains("twice"));
        let bad: ClusterConfig = toml::from_str(r#"peers = [{ id = 2, addr = "a" }]"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("host:port"));
        assert!(toml::from_str::<ClusterConfig>("replica_id = 256").is_err());
    }
}
