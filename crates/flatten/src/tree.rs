//! The in-memory tree that layers are applied to: metadata and data
//! locations only, never file contents.

use std::collections::BTreeMap;

/// Index of a node in the [`Tree`] arena. Hard links share one node.
pub(crate) type NodeId = u32;

/// Index of the root directory.
pub(crate) const ROOT: NodeId = 0;

/// Ownership, permissions, times and extended attributes of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits, including setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, by full name (e.g. `security.capability`).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// Metadata of a directory that a layer implies but never lists.
    pub fn implied_dir() -> Meta {
        Meta { perm: 0o755, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, xattrs: BTreeMap::new() }
    }
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir(BTreeMap<Vec<u8>, Child>),
    /// File data lives at `start_block` (in its layer's region), contiguous.
    File {
        start_block: u64,
        size: u64,
    },
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// A directory entry: the node it names, and the layer that last wrote it
/// (opaque whiteouts remove what lower layers wrote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Child {
    pub node: NodeId,
    pub layer: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub meta: Meta,
    pub kind: Kind,
}

/// Why a path could not be resolved inside the tree.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResolveError {
    NotADirectory(String),
    SymlinkLoop,
    Missing,
}

/// The merged filesystem tree of the layers applied so far.
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
}

const MAX_SYMLINK_HOPS: u32 = 40;

impl Tree {
    pub fn new() -> Tree {
        Tree { nodes: vec![Node { meta: Meta::implied_dir(), kind: Kind::Dir(BTreeMap::new()) }] }
    }

    pub fn add(&mut self, node: Node) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(node);
        id
    }

    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Child>> {
        match &self.nodes[dir as usize].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, Child>> {
        match &mut self.nodes[dir as usize].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_dir(&self, node: NodeId) -> bool {
        matches!(self.nodes[node as usize].kind, Kind::Dir(_))
    }

    /// Walks `components` from the root as directories, following symlinks
    /// without ever leaving the tree (`..` at the root stays at the root, an
    /// absolute link target starts at the root), creating missing
    /// directories when `create` is set (stamped with `layer`).
    pub fn walk_dirs(&mut self, components: &[Vec<u8>], create: Option<u32>) -> Result<NodeId, ResolveError> {
        let mut hops = 0;
        self.walk_from(ROOT, &mut Vec::new(), components, create, &mut hops)
    }

    fn walk_from(
        &mut self,
        start: NodeId,
        stack: &mut Vec<NodeId>,
        components: &[Vec<u8>],
        create: Option<u32>,
        hops: &mut u32,
    ) -> Result<NodeId, ResolveError> {
        // `stack` holds the directories above `cur`, so `..` can go back up.
        let mut cur = start;
        for (i, name) in components.iter().enumerate() {
            if name.as_slice() == b".." {
                cur = stack.pop().unwrap_or(ROOT);
                continue;
            }
            if name.as_slice() == b"." || name.is_empty() {
                continue;
            }
            let child = self.children(cur).and_then(|c| c.get(name)).copied();
            let next = match child {
                None => match create {
                    Some(layer) => {
                        let id = self.add(Node { meta: Meta::implied_dir(), kind: Kind::Dir(BTreeMap::new()) });
                        self.children_mut(cur).expect("cur is a directory").insert(name.clone(), Child { node: id, layer });
                        id
                    }
                    None => return Err(ResolveError::Missing),
                },
                Some(c) => c.node,
            };
            match &self.nodes[next as usize].kind {
                Kind::Dir(_) => {
                    stack.push(cur);
                    cur = next;
                }
                Kind::Symlink(target) => {
                    *hops += 1;
                    if *hops > MAX_SYMLINK_HOPS {
                        return Err(ResolveError::SymlinkLoop);
                    }
                    let target = target.clone();
                    let parts = split_path(&target);
                    let (base, mut base_stack) = if target.first() == Some(&b'/') { (ROOT, Vec::new()) } else { (cur, stack.clone()) };
                    cur = self.walk_from(base, &mut base_stack, &parts, create, hops)?;
                    *stack = base_stack;
                }
                _ => {
                    let shown: Vec<String> = components[..=i].iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
                    return Err(ResolveError::NotADirectory(shown.join("/")));
                }
            }
        }
        Ok(cur)
    }

    /// Removes every descendant of `dir` that a layer other than `layer`
    /// wrote (an opaque whiteout); directories `layer` wrote are kept and
    /// searched.
    pub fn make_opaque(&mut self, dir: NodeId, layer: u32) {
        let Some(children) = self.children_mut(dir) else { return };
        children.retain(|_, c| c.layer == layer);
        let kept: Vec<NodeId> = children.values().map(|c| c.node).collect();
        for node in kept {
            if self.is_dir(node) {
                self.make_opaque(node, layer);
            }
        }
    }
}

/// Splits a path into its non-empty components (no cleaning).
pub(crate) fn split_path(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(|c| c.to_vec()).collect()
}

/// Cleans an archive path the way a rootfs extractor must: relative to the
/// root, `.` dropped, `..` resolved lexically and never above the root.
pub(crate) fn clean_path(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in split_path(path) {
        if c.as_slice() == b".." {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symlink(tree: &mut Tree, dir: NodeId, name: &str, target: &str) {
        let id = tree.add(Node { meta: Meta::implied_dir(), kind: Kind::Symlink(target.as_bytes().to_vec()) });
        tree.children_mut(dir).unwrap().insert(name.as_bytes().to_vec(), Child { node: id, layer: 0 });
    }

    #[test]
    fn clean_path_never_escapes() {
        assert_eq!(clean_path(b"../../etc/passwd"), vec![b"etc".to_vec(), b"passwd".to_vec()]);
        assert_eq!(clean_path(b"/a/./b/../c"), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(clean_path(b"./").is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_tree() {
        let mut t = Tree::new();
        let etc = t.walk_dirs(&[b"etc".to_vec()], Some(0)).unwrap();
        symlink(&mut t, ROOT, "up", "../../../../etc");
        symlink(&mut t, ROOT, "abs", "/etc");
        assert_eq!(t.walk_dirs(&[b"up".to_vec()], None).unwrap(), etc);
        assert_eq!(t.walk_dirs(&[b"abs".to_vec()], None).unwrap(), etc);
    }

    #[test]
    fn symlink_loops_are_refused() {
        let mut t = Tree::new();
        symlink(&mut t, ROOT, "a", "b");
        symlink(&mut t, ROOT, "b", "a");
        assert_eq!(t.walk_dirs(&[b"a".to_vec()], Some(0)), Err(ResolveError::SymlinkLoop));
    }
}
