//! Cancel keys: pgtenant hands each client its own BackendKeyData and maps it to the server
//! backend currently serving that client. Client keys are never forwarded to servers; server
//! keys never reach clients. With `[cluster]`, a key another replica issued is passed on to
//! that replica (`cluster`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::cluster::{self, ClusterConfig};
use crate::protocol::messages::cancel_request;

/// The key pgtenant gave a client (its BackendKeyData).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub pid: i32,
    pub secret: i32,
}

/// The server backend a cancel must reach, with that backend's own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// Where one client's key points; a session in transaction mode keeps it and repoints it
/// on every attach without a lookup in the registry's map.
#[derive(Debug, Default)]
pub struct CancelSlot(Mutex<Option<CancelTarget>>);

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    fn get(&self) -> Option<CancelTarget> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub struct CancelRegistry {
    keys: DashMap<ClientKey, Arc<CancelSlot>>,
    /// Bounds concurrent outgoing cancels so a cancel storm cannot exhaust sockets.
    in_flight: Arc<Semaphore>,
    /// `[cluster] replica_id`, written into every key (0 without `[cluster]`).
    replica_id: u8,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        CancelRegistry::new(0)
    }
}

impl CancelRegistry {
    /// A registry whose keys say they were issued by `replica_id`.
    pub fn new(replica_id: u8) -> Self {
        CancelRegistry {
            keys: DashMap::new(),
            in_flight: Arc::new(Semaphore::new(64)),
            replica_id,
        }
    }

    pub fn replica_id(&self) -> u8 {
        self.replica_id
    }

    /// A fresh, unique key for a new client session.
    pub fn register(&self) -> ClientKey {
        let mut rng = rand::thread_rng();
        loop {
            let key = ClientKey {
                pid: cluster::issue_pid(self.replica_id, &mut rng),
                secret: rng.gen(),
            };
            if let dashmap::Entry::Vacant(slot) = self.keys.entry(key) {
                slot.insert(Arc::default());
                return key;
            }
        }
    }

    /// Points the client's key at the backend now serving it (`None` between servers).
    pub fn set_target(&self, key: ClientKey, target: Option<CancelTarget>) {
        if let Some(slot) = self.keys.get(&key) {
            slot.set(target);
        }
    }

    /// The slot of a registered key, to repoint it without a map lookup each time.
    pub fn slot(&self, key: ClientKey) -> Arc<CancelSlot> {
        self.keys
            .get(&key)
            .map(|slot| slot.clone())
            .unwrap_or_default()
    }

    pub fn remove(&self, key: ClientKey) {
        self.keys.remove(&key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Handles a client's CancelRequest: a key this replica issued cancels locally; a key of
    /// another replica is forwarded to it when `cluster` lists it. Unknown keys, clients
    /// without a server, and cancels beyond the concurrency bound are ignored, as PostgreSQL
    /// does. Returns whether a cancel (or a forward) was sent.
    pub async fn cancel(&self, key: ClientKey, cluster: Option<&ClusterConfig>) -> bool {
        let owner = cluster::replica_of(key);
        if owner == self.replica_id {
            return self.cancel_local(cluster::as_issued(key)).await;
        }
        let result = self.forward(key, owner, cluster).await;
        metrics::counter!(crate::metrics::CANCEL_REQUESTS, "result" => result).increment(1);
        result == "forwarded_peer"
    }

    /// Passes `key` to replica `owner`; returns the metric result.
    async fn forward(
        &self,
        key: ClientKey,
        owner: u8,
        cluster: Option<&ClusterConfig>,
    ) -> &'static str {
        let Some((cluster, addr)) = cluster.and_then(|c| Some((c, c.peer_addr(owner)?))) else {
            return "unknown_peer";
        };
        // A peer list that points back at us would bounce the key around: one hop only.
        let Some(hopped) = cluster::after_hop(key) else {
            return "peer_loop";
        };
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return "throttled";
        };
        match cluster::forward(addr, hopped, cluster.forward_timeout).await {
            Ok(()) => "forwarded_peer",
            Err(e) => {
                tracing::warn!(peer = owner, addr, error = %e, "forwarding a CancelRequest failed");
                "peer_failed"
            }
        }
    }

    async fn cancel_local(&self, key: ClientKey) -> bool {
        let Some(target) = self.keys.get(&key).and_then(|slot| slot.get()) else {
            metrics::counter!(crate::metrics::CANCEL_REQUESTS, "result" => "unknown_key")
                .increment(1);
            return false;
        };
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::CANCEL_REQUESTS, "result" => "throttled")
                .increment(1);
            return false;
        };
        let sent = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(target.addr).await?;
            s.write_all(&cancel_request(target.pid, target.secret))
                .await?;
            s.shutdown().await
        })
        .await;
        let ok = matches!(sent, Ok(Ok(())));
        metrics::counter!(crate::metrics::CANCEL_REQUESTS, "result" => if ok { "forwarded" } else { "failed" })
            .increment(1);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_removable() {
        let r = CancelRegistry::default();
        let a = r.register();
        let b = r.register();
        assert_ne!(a, b);
        assert_eq!(r.len(), 2);
        r.remove(a);
        assert_eq!(r.len(), 1);
    }

    #[tokio::test]
    async fn unknown_key_is_ignored() {
        let r = CancelRegistry::default();
        assert!(!r.cancel(ClientKey { pid: 1, secret: 2 }, None).await);
        let k = r.register();
        // Registered but not pinned to a server yet: nothing to cancel.
        assert!(!r.cancel(k, None).await);
    }

    #[tokio::test]
    async fn keys_of_unlisted_replicas_are_dropped_not_forwarded() {
        let r = CancelRegistry::new(1);
        let k = r.register();
        assert_eq!(cluster::replica_of(k), 1);
        let foreign = ClientKey {
            pid: cluster::issue_pid(9, &mut rand::thread_rng()),
            secret: 3,
        };
        let cluster = ClusterConfig {
            replica_id: 1,
            peers: vec![crate::cluster::PeerConfig {
                id: 1,
                addr: "127.0.0.1:1".into(),
            }],
            ..Default::default()
        };
        assert_eq!(r.forward(foreign, 9, Some(&cluster)).await, "unknown_peer");
        assert_eq!(r.forward(foreign, 9, None).await, "unknown_peer");
        assert!(!r.cancel(foreign, Some(&cluster)).await);
    }
}
