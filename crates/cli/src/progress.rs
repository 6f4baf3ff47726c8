//! Progress bars on a terminal; nothing otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// One bar per phase, on stderr, only when stderr is a terminal; a step
/// (a layer) leaves a line with its bytes and rate when it ends.
pub struct Bars {
    enabled: bool,
    /// The bar, and whether it leaves a line when the next one starts.
    bar: Mutex<Option<(ProgressBar, bool)>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars { enabled: !quiet && std::io::stderr().is_terminal(), bar: Mutex::new(None) }
    }

    pub fn done(&self) {
        if let Some((b, keep)) = self.bar.lock().expect("no panics while holding the lock").take() {
            Bars::end(b, keep);
        }
    }

    fn end(bar: ProgressBar, keep: bool) {
        bar.finish_and_clear();
        if keep {
            let (bytes, secs) = (bar.position(), bar.elapsed().as_secs_f64());
            let rate = if secs > 0.0 { (bytes as f64 / secs) as u64 } else { 0 };
            eprintln!("{}: {} in {secs:.1} s ({}/s)", bar.message(), human(bytes), human(rate));
        }
    }

    fn begin(&self, what: &str, total: u64, keep: bool) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        if let Some((old, kept)) = self.bar.lock().expect("no panics while holding the lock").replace((bar, keep)) {
            Bars::end(old, kept);
        }
    }
}

impl tessera_oci::Progress for Bars {
    fn start(&self, what: &str, total: u64) {
        self.begin(what, total, false);
    }

    fn step(&self, what: &str, total: u64) {
        self.begin(what, total, true);
    }

    fn advance(&self, n: u64) {
        if let Some((b, _)) = self.bar.lock().expect("no panics while holding the lock").as_ref() {
            b.inc(n);
        }
    }
}

/// `1.5 GiB`, `300.0 MiB`, `12 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
