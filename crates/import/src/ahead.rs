//! Reads layers ahead of the flattener: each layer's blob is read, hashed
//! and inflated on a thread of its own, up to [`AHEAD`] layers at a time,
//! while the flattener takes the layers in order (a layer's tar order still
//! drives the tree).
//!
//! A single layer still inflates on one core: gzip and zstd streams cannot
//! be split. What the threads buy is overlap: the next layer inflates while
//! this one is flattened, and this one's inflating and hashing run beside
//! the tar parsing and the copying into chunks.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::Scope;

use crossbeam_channel::{bounded, Receiver};
use tessera_oci::{Layer, Progress};

/// Layers read at once (the one being flattened included).
pub const AHEAD: usize = 2;
/// Bytes per buffer handed over.
const BUFFER: usize = 1 << 20;
/// Buffers in flight per layer.
const IN_FLIGHT: usize = 4;

/// Counts the bytes a layer's reader has taken from its blob, so the
/// flattener's thread can show them on the right layer's progress bar.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Progress for Counter {
    fn advance(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// One layer's tar, as its thread produces it.
pub struct AheadReader<'a> {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
    read: &'a Counter,
    shown: u64,
    progress: &'a dyn Progress,
    done: bool,
}

impl Read for AheadReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.buf = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => self.done = true, // the end of the layer
            }
            let read = self.read.0.load(Ordering::Relaxed);
            self.progress.advance(read - self.shown);
            self.shown = read;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Opens `layer` and starts reading it on a thread of `scope`.
fn start<'s, 'a: 's>(scope: &'s Scope<'s, '_>, layer: &'a Layer, read: &'a Counter, progress: &'a dyn Progress) -> Result<AheadReader<'a>, tessera_oci::Error> {
    let (tx, rx) = bounded(IN_FLIGHT);
    let mut tar = layer.open(read)?;
    scope.spawn(move || loop {
        let mut buf = vec![0u8; BUFFER];
        let mut filled = 0;
        while filled < BUFFER {
            match tar.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return drop(tx.send(Err(e))),
            }
        }
        if filled == 0 {
            return; // dropping the sender ends the layer
        }
        buf.truncate(filled);
        if tx.send(Ok(buf)).is_err() {
            return; // the flattener stopped
        }
    });
    Ok(AheadReader { rx, buf: Vec::new(), pos: 0, read, shown: 0, progress, done: false })
}

/// Hands out the layers' readers in order, keeping [`AHEAD`] layers read at once.
pub struct Layers<'s, 'a> {
    scope: &'s Scope<'s, 'a>,
    layers: &'a [Layer],
    counters: &'a [Counter],
    progress: &'a dyn Progress,
    next: usize,
    started: VecDeque<Result<AheadReader<'a>, tessera_oci::Error>>,
}

impl<'s, 'a: 's> Layers<'s, 'a> {
    /// `counters` has one (default) counter per layer.
    pub fn new(scope: &'s Scope<'s, 'a>, layers: &'a [Layer], counters: &'a [Counter], progress: &'a dyn Progress) -> Layers<'s, 'a> {
        assert_eq!(layers.len(), counters.len());
        let mut l = Layers { scope, layers, counters, progress, next: 0, started: VecDeque::new() };
        while l.next < layers.len().min(AHEAD) {
            l.start_next();
        }
        l
    }

    fn start_next(&mut self) {
        let started = start(self.scope, &self.layers[self.next], &self.counters[self.next], self.progress);
        self.started.push_back(started);
        self.next += 1;
    }

    /// The next layer's tar, and starts reading the one after the window.
    pub fn next_layer(&mut self) -> Option<Result<AheadReader<'a>, tessera_oci::Error>> {
        let out = self.started.pop_front()?;
        if self.next < self.layers.len() {
            self.start_next();
        }
        Some(out)
    }
}
