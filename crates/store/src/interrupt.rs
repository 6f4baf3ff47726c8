//! Leaving nothing behind when a command is interrupted.
//!
//! A command that writes temporaries (chunks staged by an import, an export's
//! file, spooled downloads) registers a cleanup for them with [`on_interrupt`];
//! writers of temporaries hold [`writing`] while they create and fill one.
//! When the command is interrupted (the CLI calls [`interrupt`] on SIGINT,
//! SIGTERM or SIGHUP), no new temporary can be started, the writes in
//! progress finish, and every registered cleanup runs before the process
//! exits. A process killed outright (`kill -9`) cannot clean up: the next
//! command that opens the store removes what dead processes left
//! ([`crate::Home::open`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

type Cleanup = Box<dyn Fn() + Send + Sync>;

/// Set once the process is interrupted; writers hold it for reading.
static INTERRUPTED: RwLock<bool> = RwLock::new(false);
static CLEANUPS: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Keeps a cleanup registered; dropping it unregisters the cleanup.
#[must_use = "the cleanup is unregistered when this is dropped"]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut list) = CLEANUPS.lock() {
            list.retain(|(id, _)| *id != self.0);
        }
    }
}

/// Runs `cleanup` if the process is interrupted while the returned
/// registration lives.
pub fn on_interrupt(cleanup: impl Fn() + Send + Sync + 'static) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()).push((id, Box::new(cleanup)));
    Registration(id)
}

/// Permission to create and write a temporary: `None` once the process is
/// interrupted. Hold it until the temporary is complete (or renamed away).
pub fn writing() -> Option<RwLockReadGuard<'static, bool>> {
    let guard = INTERRUPTED.read().unwrap_or_else(|e| e.into_inner());
    (!*guard).then_some(guard)
}

/// Stops new temporaries, waits for the ones being written, and runs every
/// registered cleanup. The caller exits afterwards.
pub fn interrupt() {
    let mut flag = INTERRUPTED.write().unwrap_or_else(|e| e.into_inner());
    *flag = true;
    let list = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner());
    for (_, cleanup) in list.iter() {
        cleanup();
    }
}

/// Whether `pid` is a running process (temporaries carry their writer's pid).
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
