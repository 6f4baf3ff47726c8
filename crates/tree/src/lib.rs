//! Function trees, after FaaSNet (USENIX ATC'21): for each function, the
//! VMs running it form a balanced binary tree; only the root reads from
//! below (cache tier, origin), every other VM streams chunks from its
//! parent. A VM is in one tree per function it runs.
//!
//! One library for the tree manager, the agents' tests and the fleet
//! simulator alike.
//!
//! **Shape.** A tree is kept *complete*: its nodes, read level by level,
//! fill every level but the last, and the last from the left. Insertion is
//! FaaSNet's: breadth-first, the first node missing a child takes the new
//! one. Deletion differs from FaaSNet's (replace the node by a child or by
//! a leaf of its subtree, then rebalance by AVL rotations): the node is
//! replaced by the tree's last node in breadth-first order, which keeps the
//! tree complete without rotations. A complete tree is balanced at every
//! node (its subtrees' heights differ by at most 1) and as shallow as a
//! binary tree of its size can be, and a deletion moves at most three
//! nodes to a new parent (the moved node and the deleted node's
//! children), where a rotation can move a whole subtree's attachment
//! points.

use std::collections::HashMap;
use std::hash::Hash;

/// A node's new parent after a change (`None`: it is the root now).
pub type Moved<N> = (N, Option<N>);

/// The tree of one function: VMs (any small copyable id) in a complete
/// binary tree.
#[derive(Clone, Debug)]
pub struct FunctionTree<N> {
    /// The nodes in breadth-first order: the children of `order[i]` are
    /// `order[2i + 1]` and `order[2i + 2]`.
    order: Vec<N>,
    at: HashMap<N, usize>,
}

impl<N> Default for FunctionTree<N> {
    fn default() -> Self {
        FunctionTree { order: Vec::new(), at: HashMap::new() }
    }
}

fn parent_index(i: usize) -> Option<usize> {
    (i > 0).then(|| (i - 1) / 2)
}

impl<N: Copy + Eq + Hash> FunctionTree<N> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` where the first node missing a child (breadth-first)
    /// takes it; returns its parent (`None`: it is the root). A node
    /// already in the tree stays where it is.
    pub fn insert(&mut self, node: N) -> Option<N> {
        if let Some(&i) = self.at.get(&node) {
            return parent_index(i).map(|p| self.order[p]);
        }
        let i = self.order.len();
        self.order.push(node);
        self.at.insert(node, i);
        parent_index(i).map(|p| self.order[p])
    }

    /// Removes `node` (a VM reclaimed or failed); returns the nodes whose
    /// parent changed, with their new parent. Nothing if it is not here.
    pub fn remove(&mut self, node: N) -> Vec<Moved<N>> {
        let Some(i) = self.at.remove(&node) else { return Vec::new() };
        let last = self.order.len() - 1;
        let old_parent = parent_index(last).map(|p| self.order[p]);
        let moved = self.order.pop().expect("the tree holds `node`");
        if i == last {
            return Vec::new();
        }
        // The last node (a leaf) takes the removed node's place.
        self.order[i] = moved;
        self.at.insert(moved, i);
        let new_parent = parent_index(i).map(|p| self.order[p]);
        let mut changes = Vec::new();
        // (A sibling taking its sibling's place keeps its parent.)
        if new_parent != old_parent {
            changes.push((moved, new_parent));
        }
        changes.extend(self.children_at(i).into_iter().map(|c| (c, Some(moved))));
        changes
    }

    fn children_at(&self, i: usize) -> Vec<N> {
        [2 * i + 1, 2 * i + 2].into_iter().filter_map(|c| self.order.get(c).copied()).collect()
    }

    /// The parent of `node`; `None` for the root or a node not here.
    pub fn parent(&self, node: N) -> Option<N> {
        self.at.get(&node).and_then(|&i| parent_index(i)).map(|p| self.order[p])
    }

    /// The children of `node` (at most two).
    pub fn children(&self, node: N) -> Vec<N> {
        self.at.get(&node).map(|&i| self.children_at(i)).unwrap_or_default()
    }

    /// The path from the root to `node`'s parent, nearest first: where
    /// `node` looks for a chunk before going below.
    pub fn ancestors(&self, node: N) -> Vec<N> {
        let mut out = Vec::new();
        let mut i = self.at.get(&node).copied();
        while let Some(p) = i.and_then(parent_index) {
            out.push(self.order[p]);
            i = Some(p);
        }
        out
    }

    /// The root: the one node that reads from below.
    pub fn root(&self) -> Option<N> {
        self.order.first().copied()
    }

    /// Whether `node` is in the tree.
    pub fn contains(&self, node: N) -> bool {
        self.at.contains_key(&node)
    }

    /// Nodes in the tree.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Levels: 0 for an empty tree, 1 for a root alone.
    pub fn height(&self) -> u32 {
        usize::BITS - self.order.len().leading_zeros()
    }

    /// Depth of `node` (the root is 0): how many hops its chunks travel.
    pub fn depth(&self, node: N) -> Option<u32> {
        self.at.get(&node).map(|&i| usize::BITS - (i + 1).leading_zeros() - 1)
    }

    /// The nodes, breadth-first.
    pub fn nodes(&self) -> &[N] {
        &self.order
    }

    /// Height of the subtree at index `i` (0 if there is none).
    fn subtree_height(&self, i: usize) -> u32 {
        if i >= self.order.len() {
            return 0;
        }
        1 + self.subtree_height(2 * i + 1).max(self.subtree_height(2 * i + 2))
    }

    /// Checks the invariants every user relies on: each node once, at most
    /// two children, the subtrees of every node of heights differing by at
    /// most 1, and the index consistent with the order.
    pub fn check(&self) -> Result<(), String> {
        if self.at.len() != self.order.len() {
            return Err(format!("{} nodes indexed, {} in the tree", self.at.len(), self.order.len()));
        }
        for (i, n) in self.order.iter().enumerate() {
            if self.at.get(n) != Some(&i) {
                return Err(format!("node at {i} is indexed elsewhere (or twice)"));
            }
            let (l, r) = (self.subtree_height(2 * i + 1), self.subtree_height(2 * i + 2));
            if l.abs_diff(r) > 1 {
                return Err(format!("node at {i}: subtrees of heights {l} and {r}"));
            }
        }
        Ok(())
    }
}

/// The trees of every function: what the tree manager keeps.
#[derive(Clone, Debug)]
pub struct Forest<F, N> {
    trees: HashMap<F, FunctionTree<N>>,
}

impl<F, N> Default for Forest<F, N> {
    fn default() -> Self {
        Forest { trees: HashMap::new() }
    }
}

impl<F: Clone + Eq + Hash, N: Copy + Eq + Hash> Forest<F, N> {
    /// No trees.
    pub fn new() -> Self {
        Self::default()
    }

    /// `node` starts serving `function`: joins its tree; returns its parent.
    pub fn join(&mut self, function: &F, node: N) -> Option<N> {
        self.trees.entry(function.clone()).or_default().insert(node)
    }

    /// `node` stops serving `function`; returns the nodes of that tree
    /// whose parent changed. An emptied tree is dropped.
    pub fn leave(&mut self, function: &F, node: N) -> Vec<Moved<N>> {
        let Some(tree) = self.trees.get_mut(function) else { return Vec::new() };
        let moved = tree.remove(node);
        if tree.is_empty() {
            self.trees.remove(function);
        }
        moved
    }

    /// `node` is gone (failed, reclaimed): leaves every tree; returns, per
    /// function, the nodes whose parent changed.
    pub fn remove_node(&mut self, node: N) -> Vec<(F, Vec<Moved<N>>)> {
        let functions: Vec<F> = self.trees.iter().filter(|(_, t)| t.contains(node)).map(|(f, _)| f.clone()).collect();
        functions.into_iter().map(|f| (f.clone(), self.leave(&f, node))).collect()
    }

    /// The tree of `function`.
    pub fn tree(&self, function: &F) -> Option<&FunctionTree<N>> {
        self.trees.get(function)
    }

    /// Every function and its tree.
    pub fn iter(&self) -> impl Iterator<Item = (&F, &FunctionTree<N>)> {
        self.trees.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn breadth_first_insertion_and_the_last_node_takes_a_removed_place() {
        let mut t = FunctionTree::new();
        assert_eq!(t.insert(1), None, "the first VM is the root");
        assert_eq!(t.insert(2), Some(1));
        assert_eq!(t.insert(3), Some(1));
        assert_eq!(t.insert(4), Some(2), "the first node missing a child takes it");
        assert_eq!(t.insert(5), Some(2));
        assert_eq!(t.insert(6), Some(3));
        assert_eq!(t.insert(2), Some(1), "a node already there stays");
        assert_eq!((t.height(), t.depth(6)), (3, Some(2)));
        assert_eq!(t.ancestors(5), vec![2, 1]);
        // An interior node goes: the last node (6) takes its place and its
        // children follow it.
        let mut moved = t.remove(2);
        moved.sort();
        assert_eq!(moved, vec![(4, Some(6)), (5, Some(6)), (6, Some(1))]);
        assert_eq!(t.children(6), vec![4, 5]);
        assert!(t.children(3).is_empty());
        // The root goes.
        let moved = t.remove(1);
        assert_eq!(t.root(), Some(5));
        assert!(moved.contains(&(5, None)));
        assert_eq!(t.remove(99), vec![], "a node not there");
        t.check().unwrap();
    }

    #[test]
    fn a_vm_is_in_one_tree_per_function() {
        let mut f: Forest<&str, u32> = Forest::new();
        for vm in 0..5 {
            f.join(&"a", vm);
        }
        for vm in 3..6 {
            f.join(&"b", vm);
        }
        let gone = f.remove_node(3);
        assert_eq!(gone.len(), 2, "3 left both trees");
        assert!(!f.tree(&"a").unwrap().contains(3) && !f.tree(&"b").unwrap().contains(3));
        f.leave(&"b", 4);
        f.leave(&"b", 5);
        assert!(f.tree(&"b").is_none(), "an emptied tree is dropped");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16),
        Remove(u16),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(prop_oneof![(0u16..200).prop_map(Op::Insert), (0u16..200).prop_map(Op::Remove)], 0..400)
    }

    proptest! {
        /// After any sequence of inserts and deletes: balanced, every live
        /// node exactly once, at most two children; and the changes a
        /// removal reports are exactly the nodes whose parent changed.
        #[test]
        fn any_sequence_keeps_the_tree_balanced_and_reports_every_move(ops in ops()) {
            let mut t = FunctionTree::new();
            let mut live = std::collections::HashSet::new();
            for op in ops {
                let before: HashMap<u16, Option<u16>> = t.nodes().iter().map(|&n| (n, t.parent(n))).collect();
                match op {
                    Op::Insert(n) => {
                        let parent = t.insert(n);
                        prop_assert_eq!(parent, t.parent(n));
                        live.insert(n);
                    }
                    Op::Remove(n) => {
                        let moved = t.remove(n);
                        live.remove(&n);
                        let mut reported: Vec<Moved<u16>> = moved;
                        reported.sort();
                        let mut actual: Vec<Moved<u16>> = t.nodes().iter().filter(|&&m| before.get(&m) != Some(&t.parent(m))).map(|&m| (m, t.parent(m))).collect();
                        actual.sort();
                        prop_assert_eq!(reported.clone(), actual);
                        prop_assert!(reported.len() <= 3);
                    }
                }
                prop_assert!(t.check().is_ok(), "{:?}", t.check());
                prop_assert_eq!(t.len(), live.len());
                for &n in &live {
                    prop_assert!(t.contains(n));
                    prop_assert!(t.children(n).len() <= 2);
                }
                // As shallow as a binary tree of this size can be.
                prop_assert_eq!(t.height(), usize::BITS - t.len().leading_zeros());
            }
        }
    }
}
