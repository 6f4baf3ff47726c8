//! Rendezvous (highest-random-weight) hashing: which cache nodes hold the
//! stripes of a chunk. Each node's weight for a chunk is a hash of both; the
//! `n` heaviest nodes hold it. Adding or removing a node moves only the
//! stripes that node gains or held.

use ring::digest::{digest, SHA256};
use tessera_chunk::ChunkId;

/// The `n` nodes (indices into `nodes`) that hold `chunk`'s stripes, in
/// stripe order.
pub fn place(nodes: &[String], chunk: &ChunkId, n: usize) -> Vec<usize> {
    let mut weighted: Vec<(u64, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut input = node.as_bytes().to_vec();
            input.push(0);
            input.extend_from_slice(&chunk.0);
            let h = digest(&SHA256, &input);
            (u64::from_le_bytes(h.as_ref()[..8].try_into().expect("8 bytes")), i)
        })
        .collect();
    weighted.sort_by(|a, b| b.cmp(a));
    weighted.into_iter().take(n).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect()
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let (before, after) = (nodes(6), nodes(7));
        let mut moved = 0;
        let total = 2000;
        for c in 0..total {
            let id = ChunkId::of(&(c as u32).to_le_bytes());
            let a: Vec<&String> = place(&before, &id, 5).into_iter().map(|i| &before[i]).collect();
            let b: Vec<&String> = place(&after, &id, 5).into_iter().map(|i| &after[i]).collect();
            // Every node that holds a stripe after, and was there before, held it before.
            for node in &b {
                if *node != &after[6] {
                    assert!(a.contains(node));
                }
            }
            moved += b.iter().filter(|n| **n == &after[6]).count();
        }
        // The new node takes about 5/7 of a stripe per chunk.
        let share = moved as f64 / total as f64;
        assert!((0.6..0.85).contains(&share), "{share}");
    }

    #[test]
    fn placement_is_spread_and_distinct() {
        let ns = nodes(5);
        let id = ChunkId::of(b"x");
        let mut p = place(&ns, &id, 5);
        p.sort();
        assert_eq!(p, vec![0, 1, 2, 3, 4]);
        assert_eq!(place(&ns, &id, 3).len(), 3);
    }
}
