//! The cache tier client ([`CacheTier`]) against five real cache nodes in
//! this process, through the shared [`ChunkSource`] suite.

use std::sync::Arc;

use bytes::Bytes;
use tessera_cache::tier::{CacheTier, ReadPolicy, TierOptions};
use tessera_cache::ChunkSource;
use tessera_cachenode::{CacheNode, NodeOptions};
use tessera_chunk::ChunkId;

struct Fixture {
    nodes: Vec<Arc<CacheNode>>,
    tier: Arc<CacheTier>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn start(dir: &std::path::Path) -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..5 {
            let options = NodeOptions { memory_bytes: 16 << 20, disk_bytes: 64 << 20, token: Some("t0ken".into()) };
            let node = Arc::new(CacheNode::open(&dir.join(format!("node{i}")), options).unwrap());
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            runtime.spawn(tessera_cachenode::serve(node.clone(), listener, None, std::future::pending()));
            nodes.push(node);
        }
        let tier = CacheTier::new(TierOptions { nodes: addrs, k: 4, m: 1, token: Some("t0ken".into()), policy: ReadPolicy::FirstK, tls_ca: None }).unwrap();
        Fixture { nodes, tier: Arc::new(tier), runtime }
    }
}

impl tessera_cache::conformance::Fixture for Fixture {
    fn source(&self) -> Arc<dyn ChunkSource> {
        self.tier.clone()
    }

    fn hold(&self, id: &ChunkId, sealed: &[u8]) {
        self.tier.offer(id, &Bytes::copy_from_slice(sealed), &Default::default());
        self.tier.drain();
    }

    /// A node lies: one stripe of the chunk, well formed, with a wrong byte.
    fn damage(&self, id: &ChunkId) -> bool {
        let node = &self.nodes[0];
        let stripe = self.runtime.block_on(node.get(*id)).expect("every node holds a stripe of every chunk with 4+1 on 5");
        let mut bad = stripe.to_vec();
        let at = bad.len() - 3;
        bad[at] ^= 0x21;
        self.runtime.block_on(node.put(*id, Bytes::from(bad))).unwrap();
        true
    }

    fn keeps_offers(&self) -> bool {
        true
    }
}

#[test]
fn the_cache_tier_passes_the_chunk_source_suite() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::start(dir.path());
    tessera_cache::conformance::run(&fixture);
}
