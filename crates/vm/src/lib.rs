//! Running an image in a microVM whose root disk is the image, served
//! lazily: the guest kernel ([`Kernel`]: Debian's cloud kernel, fetched once
//! with apt, kept off the host's /boot), an initramfs made here
//! ([`build_initramfs`]: the `tessera-guest` init, its shared libraries, the
//! virtio modules, the run's spec), the accelerator ([`accel`]), QEMU
//! ([`Launch`], booting from a [`RootDisk`]), and the whole run with its
//! cold-start report ([`run::run`]): a private agent, the start-up profile
//! recorded or prefetched, the program's streams forwarded.
//!
//! Serial ports carry the streams: ttyS0 the console (kernel messages),
//! ttyS1 the program's stdout, ttyS2 its stderr, ttyS3 `start` / `exit N`.
#![deny(missing_docs)]

pub mod accel;
mod initramfs;
mod kernel;
mod qemu;
pub mod run;

pub use accel::Accel;
pub use initramfs::build as build_initramfs;
pub use kernel::{Kernel, KernelChoice, MODULES};
pub use qemu::{Launch, RootDisk};

use std::path::PathBuf;

use tessera_chunk::ImageConfig;

/// Errors of preparing or running a VM, each with what was being done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A tool (apt, dpkg-deb, ldd, qemu) could not run, or failed.
    #[error("{command}: {reason}")]
    Tool {
        /// The command.
        command: String,
        /// Its error output, or why it did not start.
        reason: String,
    },
    /// The guest kernel is not where it should be.
    #[error("guest kernel: {0}")]
    Kernel(String),
    /// The image gives nothing to run.
    #[error("{0}: the image has no entrypoint or cmd; give one after --")]
    NoEntrypoint(String),
    /// A `--env` that is not `KEY=VALUE`.
    #[error("--env {0:?}: use KEY=VALUE")]
    BadEnv(String),
    /// The VM ended without its program's exit code.
    #[error("the VM stopped ({status}) without reporting an exit code; {qemu}its console ended with:\n{console}")]
    NoExitCode {
        /// QEMU's exit status.
        status: String,
        /// What QEMU said, if anything.
        qemu: String,
        /// The last lines of the console.
        console: String,
    },
    /// QEMU did not start the VM.
    #[error("qemu: {0}")]
    Qemu(String),
    /// The agent serving the root disk failed.
    #[error(transparent)]
    Agent(#[from] tessera_agent::Error),
    /// The image could not be found or opened.
    #[error(transparent)]
    Store(#[from] tessera_store::Error),
    /// The image's disk could not be opened.
    #[error(transparent)]
    Export(#[from] tessera_agent::device::ExportError),
}

impl Error {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}

/// What to run inside the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSpec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory inside the image.
    pub workdir: String,
    /// `USER[:GROUP]`, names or numbers.
    pub user: String,
    /// Mount the root read-only (with a fresh tmpfs on `/tmp`).
    pub read_only: bool,
}

impl RunSpec {
    /// The OCI rule, as `docker run IMAGE ARGS` applies it: entrypoint plus
    /// cmd, with `args` (when given) in place of cmd; `env` overrides the
    /// image's variables of the same name.
    pub fn from_config(config: &ImageConfig, args: &[String], env: &[String]) -> RunSpec {
        let mut argv = config.entrypoint.clone();
        argv.extend(if args.is_empty() { config.cmd.clone() } else { args.to_vec() });
        let mut merged: Vec<String> = config.env.clone();
        for e in env {
            let key = e.split('=').next().unwrap_or(e);
            merged.retain(|m| m.split('=').next() != Some(key));
            merged.push(e.clone());
        }
        RunSpec { argv, env: merged, workdir: config.working_dir.clone(), user: config.user.clone(), read_only: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_run_semantics() {
        let c = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "echo hi".into()],
            env: vec!["A=1".into(), "B=2".into()],
            ..Default::default()
        };
        let s = RunSpec::from_config(&c, &[], &["B=3".into()]);
        assert_eq!(s.argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(s.env, ["A=1", "B=3"]);
        let s = RunSpec::from_config(&c, &["-c".into(), "exit 3".into()], &[]);
        assert_eq!(s.argv, ["/bin/sh", "-c", "exit 3"]);
    }
}
