//! An in-memory chunk store, for tests and for caches.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tessera_chunk::ChunkId;

use crate::{Bytes, ChunkStore, Error, ImmediateBatch, Put, PutBatch, Result};

/// Chunks in a hash map; clones share one map.
#[derive(Default, Clone)]
pub struct MemoryStore {
    chunks: Arc<RwLock<HashMap<ChunkId, Bytes>>>,
}

impl ChunkStore for MemoryStore {
    fn put(&self, id: &ChunkId, bytes: &[u8]) -> Result<Put> {
        let mut map = self.chunks.write().expect("no panics while holding the lock");
        if map.contains_key(id) {
            return Ok(Put::AlreadyPresent);
        }
        map.insert(*id, Bytes::copy_from_slice(bytes));
        Ok(Put::Created)
    }

    fn get(&self, id: &ChunkId) -> Result<Bytes> {
        let map = self.chunks.read().expect("no panics while holding the lock");
        map.get(id).cloned().ok_or(Error::NotFound(*id))
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunks.read().expect("no panics while holding the lock").contains_key(id))
    }

    fn list(&self) -> Result<Vec<ChunkId>> {
        Ok(self.chunks.read().expect("no panics while holding the lock").keys().copied().collect())
    }

    fn delete(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunks.write().expect("no panics while holding the lock").remove(id).is_some())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn batch(&self) -> Box<dyn PutBatch + '_> {
        Box::new(ImmediateBatch::new(self))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        crate::conformance::run(&super::MemoryStore::default());
    }
}
