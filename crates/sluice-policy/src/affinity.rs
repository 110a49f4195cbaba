//! Which backend owns an object a client created through the gateway (a
//! stored response, a file, a batch, a vector store...): learnt from the
//! create call's answer, asked for every later call that names the id.
//!
//! The map sits behind [`AffinityStore`] so that replicas can later share
//! it (Redis); [`MemoryAffinity`] is the process-local one. Backends are
//! named, not numbered, so that replicas with the same configuration agree.

use std::sync::Arc;
use std::time::Duration;

use sluice_base::Clock;
use sluice_routing::AffinityMap;

/// A request that names a backend-owned object, or creates one.
#[derive(Debug, Default)]
pub struct OwnedCall {
    /// The id the request names (in its path or body): the first one whose
    /// owner is known, else the first one.
    pub named: Option<String>,
    /// The owner of `named` was known: the request went there.
    pub pinned: bool,
    /// The call creates an object whose id its answer carries.
    pub creates: bool,
    /// The call deletes `named`.
    pub deletes: bool,
    /// The call is about `named` itself, not something below it.
    pub itself: bool,
    /// Reads the created object's id from the answer when no usage scanner
    /// does; dropped once it has found it.
    pub id_scanner: Option<sluice_tokens::UsageScanner>,
}

/// Where id → backend name is kept.
#[async_trait::async_trait]
pub trait AffinityStore: Send + Sync + std::fmt::Debug {
    /// The backend that created `id`, if known.
    async fn owner(&self, id: &str) -> Option<Arc<str>>;
    /// `backend` created (or answered for) `id`.
    async fn remember(&self, id: &str, backend: Arc<str>);
    /// `id` is gone (deleted, or its owner no longer has it).
    async fn forget(&self, id: &str);
}

/// A bounded in-process map with a time to live.
#[derive(Debug)]
pub struct MemoryAffinity {
    map: AffinityMap<Arc<str>>,
    clock: Arc<dyn Clock>,
}

impl MemoryAffinity {
    pub fn new(max_ids: usize, ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        MemoryAffinity {
            map: AffinityMap::new(max_ids, ttl),
            clock,
        }
    }

    /// Ids held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drop expired ids; how many went.
    pub fn sweep(&self) -> usize {
        self.map.sweep(self.clock.monotonic())
    }
}

#[async_trait::async_trait]
impl AffinityStore for MemoryAffinity {
    async fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.map.get(id, self.clock.monotonic())
    }

    async fn remember(&self, id: &str, backend: Arc<str>) {
        self.map.insert(id, backend, self.clock.monotonic());
    }

    async fn forget(&self, id: &str) {
        self.map.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_base::ManualClock;

    #[tokio::test]
    async fn remembers_forgets_and_expires() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000)));
        let store = MemoryAffinity::new(100, Duration::from_secs(60), clock.clone());
        assert!(store.is_empty());
        assert_eq!(store.owner("resp_1").await, None);
        store.remember("resp_1", "eastus".into()).await;
        store.remember("file-2", "westus".into()).await;
        assert_eq!(store.owner("resp_1").await.as_deref(), Some("eastus"));
        assert_eq!(store.len(), 2);
        assert!(!store.is_empty());
        assert_eq!(store.sweep(), 0, "nothing has expired yet");
        store.forget("file-2").await;
        assert_eq!(store.owner("file-2").await, None);
        store.remember("conv_3", "sweden".into()).await;
        clock.advance(Duration::from_secs(61));
        assert_eq!(store.sweep(), 2);
        assert!(store.is_empty());
        assert_eq!(store.owner("resp_1").await, None);
    }
}
