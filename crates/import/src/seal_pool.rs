//! Seals chunks on all cores while the flattener produces them.

use std::sync::Mutex;
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};
use tessera_chunk::{is_zero, seal_in_place, ChunkRef, Salt};
use tessera_flatten::{ChunkSink, SinkError};
use tessera_store::{Error, PutBatch};

/// What the sealers did.
#[derive(Default)]
pub struct Sealed {
    /// (chunk index, reference) of every non-hole chunk.
    pub refs: Vec<(u64, ChunkRef)>,
}

/// The producer's end: hands chunks to the sealers, and takes back spent
/// buffers.
pub struct PoolSink<'p> {
    tx: Sender<(u64, Vec<u8>)>,
    spent: Receiver<Vec<u8>>,
    failure: &'p Mutex<Option<Error>>,
}

/// Runs `produce` on this thread while `threads` sealers seal what it hands
/// to its sink and stage it in `batch`. The queue is bounded, so memory stays
/// at a few chunks per thread however large the image is. Returns what
/// `produce` returned and what was sealed (or the first store error).
pub fn seal_while<T>(salt: &Salt, batch: &dyn PutBatch, threads: usize, produce: impl FnOnce(&mut PoolSink<'_>) -> T) -> (T, Result<Sealed, Error>) {
    let failure = Mutex::new(None);
    let (tx, rx) = bounded::<(u64, Vec<u8>)>(threads.max(1) * 2);
    let (spent_tx, spent_rx) = bounded::<Vec<u8>>(threads.max(1) * 3);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let rx = rx.clone();
                let spent = spent_tx.clone();
                let failure = &failure;
                s.spawn(move || seal_worker(rx, spent, salt, batch, failure))
            })
            .collect();
        drop((rx, spent_tx));
        let mut sink = PoolSink { tx, spent: spent_rx, failure: &failure };
        let out = produce(&mut sink);
        drop(sink); // closes the queue: workers finish what is queued and stop
        let mut all = Sealed::default();
        for w in workers {
            let t = w.join().expect("seal workers do not panic");
            all.refs.extend(t.refs);
        }
        let result = match failure.lock().expect("no panics while holding the lock").take() {
            Some(e) => Err(e),
            None => Ok(all),
        };
        (out, result)
    })
}

fn seal_worker(rx: Receiver<(u64, Vec<u8>)>, spent: Sender<Vec<u8>>, salt: &Salt, batch: &dyn PutBatch, failure: &Mutex<Option<Error>>) -> Sealed {
    let mut tally = Sealed::default();
    for (index, mut buf) in rx {
        let sealed = seal_one(&mut buf, salt, batch, failure);
        let _ = spent.try_send(buf); // full: let it drop
        if let Some(r) = sealed {
            tally.refs.push((index, r));
        }
    }
    tally
}

/// Seals and stages one chunk; `None` for a hole or a failure (recorded).
fn seal_one(buf: &mut Vec<u8>, salt: &Salt, batch: &dyn PutBatch, failure: &Mutex<Option<Error>>) -> Option<ChunkRef> {
    if failure.lock().expect("no panics while holding the lock").is_some() || is_zero(buf) {
        return None; // failing: just drain the queue; or a hole: stored nowhere
    }
    let (id, key) = seal_in_place(salt, buf);
    if let Err(e) = batch.put(&id, buf) {
        failure.lock().expect("no panics while holding the lock").get_or_insert(e);
        return None;
    }
    Some(ChunkRef { id, key })
}

impl ChunkSink for PoolSink<'_> {
    fn put_chunk(&mut self, index: u64, data: Vec<u8>) -> Result<(), SinkError> {
        if let Some(e) = self.failure.lock().expect("no panics while holding the lock").as_ref() {
            return Err(e.to_string().into());
        }
        self.tx.send((index, data)).map_err(|_| "seal workers stopped".into())
    }

    fn recycled(&mut self) -> Option<Vec<u8>> {
        self.spent.try_recv().ok()
    }
}
