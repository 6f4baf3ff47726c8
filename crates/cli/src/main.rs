//! `tessera`: the command line. Parsing lives in `flags`, each command in
//! `commands`; the work happens in the library crates.

mod commands;
mod flags;
mod log;
mod progress;
mod ready;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    // Commands that run to an end leave nothing behind when interrupted;
    // the servers shut down on their own signal handlers.
    if !matches!(
        cli.command,
        flags::Command::Serve(_) | flags::Command::Mount(_) | flags::Command::Run(_) | flags::Command::Cachenode(_) | flags::Command::Treemgr(_)
    ) {
        clean_up_on_signals();
    }
    log::init(matches!(&cli.command, flags::Command::Run(r) if r.verbose));
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: error: {}", message(&e));
            ExitCode::from(2)
        }
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in every thread and waits for them on
/// one of its own, which removes this process's temporaries
/// ([`tessera_store::interrupt`]) and exits as the signal would have.
/// Called before any other thread starts, so all of them inherit the mask.
fn clean_up_on_signals() {
    // SAFETY: the signal set is initialised by sigemptyset before use, and
    // pthread_sigmask only changes this thread's mask (inherited by the
    // threads it starts).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        tessera_store::interrupt::interrupt();
        eprintln!("tessera: interrupted; partial files removed");
        std::process::exit(128 + sig);
    });
}

/// The error and its causes on one line, each cause once (many errors
/// already quote their source in their own message).
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
