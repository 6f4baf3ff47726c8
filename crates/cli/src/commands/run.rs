//! `tessera run`: flags to [`tessera_vm::run`], its report to the terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use tessera_store::Home;
use tessera_vm::accel::AccelChoice;
use tessera_vm::run::RunOptions;
use tessera_vm::KernelChoice;

use super::options::{agent_options, bound_allocator};
use crate::flags::{LimitArgs, RunArgs};
use crate::progress::human;

fn kernel_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_KERNEL_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("tessera/kernel")
}

/// `tessera run`.
pub fn run(home: Home, a: RunArgs) -> Result<ExitCode> {
    bound_allocator();
    let mut agent = agent_options(&home, LimitArgs::default(), a.cache)?;
    agent.function = a.function;
    let options = RunOptions {
        image: a.name.clone(),
        memory_mib: a.memory,
        cpus: a.cpus,
        accel: match a.accel.as_str() {
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            _ => AccelChoice::Auto,
        },
        env: a.env,
        args: a.args,
        profile: !a.no_profile,
        read_only: a.read_only,
        kernel: match a.kernel.as_str() {
            "built" => KernelChoice::Built,
            "debian" => KernelChoice::Debian,
            _ => KernelChoice::Auto,
        },
        console_to_stderr: a.verbose,
        kernel_dir: kernel_dir(),
        guest: std::env::current_exe()?.with_file_name("tessera-guest"),
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        disk: if a.disk == "nbd" { tessera_agent::control::DiskKind::Nbd } else { tessera_agent::control::DiskKind::VhostUser },
        agent: a.agent,
    };
    let report = tessera_vm::run::run(&home, agent, options)?;
    if a.report {
        let fetched = report.bytes_fetched;
        eprintln!(
            "tessera: {} ({}, {} kernel, {} agent, {} disk, {}): vm started {:.2} s, entrypoint {:.2} s, done {:.2} s, exit {}; fetched {} of {} ({:.1}%)",
            report.image,
            report.accel,
            report.kernel,
            report.agent,
            report.disk,
            match (report.profile, report.profile_chunks) {
                (true, n) => format!("prefetched a profile of {n} chunks"),
                (false, 0) => "no profile".to_owned(),
                (false, n) => format!("recorded a profile of {n} chunks"),
            },
            report.seconds_to_vm_start,
            report.seconds_to_entrypoint.unwrap_or(f64::NAN),
            report.seconds_total,
            report.exit_code,
            human(fetched),
            human(report.disk_bytes),
            100.0 * fetched as f64 / report.disk_bytes as f64
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::from(report.exit_code.clamp(0, 255) as u8))
}
