//! Telling the world where a server listens: one log line, and with
//! `--ready-file` a JSON file written whole (temporary, then renamed) once
//! every listener is bound, so scripts and tests never guess a port.

use std::path::Path;

use anyhow::{Context, Result};

/// Logs `line` and writes `addresses` to `ready_file`, if given.
pub fn announce(line: &str, addresses: &serde_json::Value, ready_file: Option<&Path>) -> Result<()> {
    eprintln!("{line}");
    let Some(path) = ready_file else { return Ok(()) };
    write_whole(path, format!("{addresses}\n").as_bytes()).with_context(|| format!("writing the ready file {}", path.display()))
}

/// Writes `contents` to `path` whole or not at all: a temporary beside it,
/// renamed into place (and removed if that fails).
pub fn write_whole(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, contents).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
