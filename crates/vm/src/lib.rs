//! `tessera run`'s machinery: a stock Debian cloud kernel (fetched once with
//! apt, kept off the host's /boot), an initramfs made here (the
//! `tessera-guest` init, its shared libraries, the virtio modules, the run's
//! spec), and QEMU booting it with the agent's lazy NBD export as its root.
//!
//! Serial ports carry the streams: ttyS0 the console (kernel messages),
//! ttyS1 the program's stdout, ttyS2 its stderr, ttyS3 `start` / `exit N`.
#![deny(missing_docs)]

mod initramfs;
mod kernel;
mod qemu;

pub use initramfs::build as build_initramfs;
pub use kernel::{Kernel, MODULES};
pub use qemu::{Accel, Launch};

use tessera_chunk::ImageConfig;

/// Errors of preparing or running a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest kernel could not be fetched or unpacked.
    #[error("guest kernel: {0}")]
    Kernel(String),
    /// The initramfs could not be built.
    #[error("initramfs: {0}")]
    Initramfs(String),
    /// QEMU could not be started or failed.
    #[error("qemu: {0}")]
    Qemu(String),
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
        RunSpec { argv, env: merged, workdir: config.working_dir.clone(), user: config.user.clone() }
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
