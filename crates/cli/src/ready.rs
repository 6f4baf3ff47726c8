//! Telling the world where a server listens: one log line, and with
//! `--ready-file` a JSON file written whole (temporary, then renamed) once
//! every listener is bound, so scripts and tests never guess a port.

use std::path::Path;

use anyhow::{Context, Result};

/// Logs `line` and writes `addresses` to `ready_file`, if given.
pub fn announce(line: &str, addresses: &serde_json::Value, ready_file: Option<&Path>) -> Result<()> {
    eprintln!("{line}");
    let Some(path) = ready_file else { return Ok(()) };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addresses}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing the ready file {}", path.display()))
}
