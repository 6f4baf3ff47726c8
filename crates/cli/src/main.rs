//! `tessera`: the command line. Parsing lives in `flags`, each command in
//! `commands`; the work happens in the library crates.

mod commands;
mod flags;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
