//! Cancel keys: pgtenant hands each client its own BackendKeyData and maps it to the server
//! backend currently serving that client. Client keys are never forwarded; server keys never
//! reach clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

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

#[derive(Debug)]
pub struct CancelRegistry {
    keys: DashMap<ClientKey, Option<CancelTarget>>,
    /// Bounds concurrent outgoing cancels so a cancel storm cannot exhaust sockets.
    in_flight: Arc<Semaphore>,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        CancelRegistry {
            keys: DashMap::new(),
            in_flight: Arc::new(Semaphore::new(64)),
        }
    }
}

impl CancelRegistry {
    /// A fresh, unique key for a new client session.
    pub fn register(&self) -> ClientKey {
        let mut rng = rand::thread_rng();
        loop {
            let key = ClientKey {
                pid: rng.gen_range(1..i32::MAX),
                secret: rng.gen(),
            };
            if let dashmap::Entry::Vacant(slot) = self.keys.entry(key) {
                slot.insert(None);
                return key;
            }
        }
    }

    /// Points the client's key at the backend now serving it (`None` between servers).
    pub fn set_target(&self, key: ClientKey, target: Option<CancelTarget>) {
        if let Some(mut slot) = self.keys.get_mut(&key) {
            *slot = target;
        }
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

    /// Cancels the current query of the client holding `key`. Unknown keys, clients without
    /// a server, and cancels beyond the concurrency bound are ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: ClientKey) -> bool {
        let Some(target) = self.keys.get(&key).and_then(|t| *t) else {
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
        assert!(!r.cancel(ClientKey { pid: 1, secret: 2 }).await);
        let k = r.register();
        // Registered but not pinned to a server yet: nothing to cancel.
        assert!(!r.cancel(k).await);
    }
}
