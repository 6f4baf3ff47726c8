//! LRU-K eviction with K = 2 (O'Neil, O'Neil and Weikum, SIGMOD'93).
//!
//! The victim is the entry whose second most recent access is oldest;
//! entries seen only once have no second access and go first (oldest first).
//! So a stream of chunks read once, as a cron job reads them, cycles through
//! the once-seen entries and never flushes chunks that are read again and
//! again. Evicted keys leave a bounded history of their last access, so a
//! key that comes back soon counts as seen twice. Accesses to a key within
//! a correlated-reference period of its last one (several reads of one chunk
//! by one sequential reader) count as one reference.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;

/// A size-bounded map with LRU-2 eviction.
pub struct Lru2<K, V> {
    capacity: u64,
    used: u64,
    clock: u64,
    entries: HashMap<K, Entry<V>>,
    /// Entries seen once, by last access.
    once: BTreeSet<(u64, K)>,
    /// Entries seen at least twice, by second most recent access.
    twice: BTreeSet<(u64, K)>,
    /// Last access of recently evicted keys (bounded).
    history: HashMap<K, u64>,
    history_order: VecDeque<(K, u64)>,
    history_limit: usize,
    /// Accesses this close (in accesses to any key) to a key's last one are
    /// the same reference.
    correlated: u64,
}

struct Entry<V> {
    value: V,
    size: u64,
    last: u64,
    /// Second most recent access, once there is one.
    previous: Option<u64>,
}

impl<K: Hash + Eq + Ord + Clone, V> Lru2<K, V> {
    /// A cache holding up to `capacity` (in the unit of the sizes given to
    /// [`Lru2::insert`]), remembering up to `history_limit` evicted keys,
    /// and treating accesses within `correlated` accesses of a key's last
    /// one as the same reference.
    pub fn new(capacity: u64, history_limit: usize, correlated: u64) -> Self {
        Lru2 {
            capacity,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
            once: BTreeSet::new(),
            twice: BTreeSet::new(),
            history: HashMap::new(),
            history_order: VecDeque::new(),
            history_limit,
            correlated,
        }
    }

    /// Looks `key` up, counting an access.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.clock += 1;
        let now = self.clock;
        let e = self.entries.get_mut(key)?;
        let (last, previous) = (e.last, e.previous);
        e.last = now;
        if now - last <= self.correlated {
            // The same reference: only its time moves.
            if previous.is_none() {
                self.once.remove(&(last, key.clone()));
                self.once.insert((now, key.clone()));
            }
        } else {
            e.previous = Some(last);
            match previous {
                None => self.once.remove(&(last, key.clone())),
                Some(p) => self.twice.remove(&(p, key.clone())),
            };
            self.twice.insert((last, key.clone()));
        }
        self.entries.get(key).map(|e| &e.value)
    }

    /// Whether `key` is cached (no access is counted).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Inserts `key` (an access: a key already cached, or recently evicted,
    /// counts as seen again); returns the entries evicted to make room. A
    /// value larger than the whole capacity is not kept.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Vec<(K, V)> {
        self.clock += 1;
        let now = self.clock;
        let previous = match self.unlink(&key) {
            Some(old) => Some(old.last),
            None => self.history.remove(&key),
        };
        let mut evicted = Vec::new();
        if size > self.capacity {
            return evicted;
        }
        while self.used + size > self.capacity {
            let Some(victim) = self.once.first().or_else(|| self.twice.first()).map(|(_, k)| k.clone()) else { break };
            let e = self.unlink(&victim).expect("victims are cached");
            self.remember(victim.clone(), e.last);
            evicted.push((victim, e.value));
        }
        match previous {
            Some(p) => self.twice.insert((p, key.clone())),
            None => self.once.insert((now, key.clone())),
        };
        self.entries.insert(key, Entry { value, size, last: now, previous });
        self.used += size;
        evicted
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.unlink(key).map(|e| e.value)
    }

    fn unlink(&mut self, key: &K) -> Option<Entry<V>> {
        let e = self.entries.remove(key)?;
        match e.previous {
            None => self.once.remove(&(e.last, key.clone())),
            Some(p) => self.twice.remove(&(p, key.clone())),
        };
        self.used -= e.size;
        Some(e)
    }

    /// Sum of the sizes of cached entries.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bound given at creation.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn remember(&mut self, key: K, at: u64) {
        if self.history_limit == 0 {
            return;
        }
        self.history.insert(key.clone(), at);
        self.history_order.push_back((key, at));
        while self.history_order.len() > self.history_limit {
            let (k, t) = self.history_order.pop_front().expect("non-empty");
            if self.history.get(&k) == Some(&t) {
                self.history.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook definition, computed the slow way: every access of every
    /// key is kept, and the victim is found by scanning.
    struct Reference {
        capacity: u64,
        cached: Vec<(u32, u64)>, // key, size
        accesses: HashMap<u32, Vec<u64>>,
        /// Last access of evicted keys, and the order they were evicted in.
        evicted: HashMap<u32, u64>,
        evictions: VecDeque<(u32, u64)>,
        clock: u64,
        history_limit: usize,
        correlated: u64,
    }

    impl Reference {
        fn get(&mut self, k: u32) -> bool {
            self.clock += 1;
            if !self.cached.iter().any(|c| c.0 == k) {
                return false;
            }
            let a = self.accesses.get_mut(&k).unwrap();
            if self.clock - a[a.len() - 1] <= self.correlated {
                *a.last_mut().unwrap() = self.clock;
            } else {
                a.push(self.clock);
            }
            true
        }

        fn insert(&mut self, k: u32, size: u64) {
            self.clock += 1;
            let now = self.clock;
            let mut hist = if self.cached.iter().any(|c| c.0 == k) {
                self.cached.retain(|c| c.0 != k);
                self.accesses.remove(&k).unwrap()
            } else {
                self.evicted.remove(&k).into_iter().collect()
            };
            if size > self.capacity {
                return;
            }
            while self.cached.iter().map(|c| c.1).sum::<u64>() + size > self.capacity {
                // Largest backward 2-distance: seen once (oldest last access) before seen twice (oldest second access).
                let rank = |c: &(u32, u64)| {
                    let a = &self.accesses[&c.0];
                    if a.len() < 2 {
                        (0, a[a.len() - 1])
                    } else {
                        (1, a[a.len() - 2])
                    }
                };
                let victim = *self.cached.iter().min_by_key(|c| rank(c)).unwrap();
                self.cached.retain(|c| c.0 != victim.0);
                let last = *self.accesses.remove(&victim.0).unwrap().last().unwrap();
                if self.history_limit > 0 {
                    self.evicted.insert(victim.0, last);
                    self.evictions.push_back((victim.0, last));
                    while self.evictions.len() > self.history_limit {
                        let (ek, et) = self.evictions.pop_front().unwrap();
                        if self.evicted.get(&ek) == Some(&et) {
                            self.evicted.remove(&ek);
                        }
                    }
                }
            }
            hist.push(now);
            self.accesses.insert(k, hist);
            self.cached.push((k, size));
        }
    }

    proptest! {
        #[test]
        fn matches_the_reference(ops in proptest::collection::vec((0u32..12, 1u64..4, any::<bool>()), 1..300), cap in 3u64..12, hist in 0usize..6, corr in 0u64..4) {
            let mut lru = Lru2::new(cap, hist, corr);
            let mut model = Reference { capacity: cap, cached: Vec::new(), accesses: HashMap::new(), evicted: HashMap::new(), evictions: VecDeque::new(), clock: 0, history_limit: hist, correlated: corr };
            for (k, size, is_get) in ops {
                if is_get {
                    prop_assert_eq!(lru.get(&k).is_some(), model.get(k));
                } else {
                    lru.insert(k, (), size);
                    model.insert(k, size);
                }
                let mut a: Vec<u32> = lru.entries.keys().copied().collect();
                let mut b: Vec<u32> = model.cached.iter().map(|c| c.0).collect();
                a.sort();
                b.sort();
                prop_assert_eq!(a, b);
                prop_assert!(lru.used() <= cap);
            }
        }
    }

    #[test]
    fn one_shot_scans_do_not_flush_hot_entries() {
        let mut lru = Lru2::new(10, 10, 0);
        for k in 0..5u32 {
            lru.insert(k, (), 1);
            lru.get(&k);
        }
        for k in 100..1000u32 {
            lru.insert(k, (), 1);
        }
        for k in 0..5u32 {
            assert!(lru.get(&k).is_some(), "hot entry {k} was flushed by a scan");
        }
    }
}

#[cfg(test)]
mod correlation_tests {
    use super::Lru2;

    #[test]
    fn a_scan_that_reads_each_chunk_several_times_still_does_not_flush() {
        let mut lru = Lru2::new(10, 10, 4);
        for k in 0..5u32 {
            lru.insert(k, (), 1);
            for _ in 0..10 {
                lru.get(&9999); // other traffic between the hot accesses
            }
            lru.get(&k);
        }
        // A one-shot scan that reads each of its chunks 4 times in a row.
        for k in 100..1000u32 {
            lru.insert(k, (), 1);
            for _ in 0..3 {
                lru.get(&k);
            }
        }
        for k in 0..5u32 {
            assert!(lru.get(&k).is_some(), "hot entry {k} was flushed by a scan");
        }
    }
}
