//! A whole run: an image's entrypoint in a microVM on its lazy disk, the
//! program's streams forwarded, the start-up profile recorded or
//! prefetched, and a cold-start [`Report`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tessera_agent::control::{self, Attached, Detached, DiskKind, ProfileMode};
use tessera_agent::{Agent, AgentOptions, Background, Frontend, Listen};
use tessera_chunk::CHUNK_SIZE;
use tessera_store::Home;

use crate::accel::{self, AccelChoice};
use crate::{Error, Kernel, KernelChoice, Launch, RootDisk, RunSpec};

/// What to run, and how.
pub struct RunOptions {
    /// The image.
    pub image: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// The accelerator wanted.
    pub accel: AccelChoice,
    /// Extra `KEY=VALUE` environment (overrides the image's).
    pub env: Vec<String>,
    /// Arguments in place of the image's cmd, if any.
    pub args: Vec<String>,
    /// Use a recorded start-up profile, or record one.
    pub profile: bool,
    /// The console (kernel messages) to the program's stderr rather than a log.
    pub console_to_stderr: bool,
    /// Where the guest kernel is kept.
    pub kernel_dir: PathBuf,
    /// Which guest kernel to boot.
    pub kernel: KernelChoice,
    /// The `tessera-guest` binary (PID 1 in the VM).
    pub guest: PathBuf,
    /// Where the program's stdout goes.
    pub stdout: Box<dyn Write + Send>,
    /// Where the program's stderr goes.
    pub stderr: Box<dyn Write + Send>,
    /// How the VM reaches its disk.
    pub disk: DiskKind,
    /// Attach the image itself (`NAME`, read-only; one VM at a time per
    /// agent) rather than a copy-on-write overlay; the guest gets a tmpfs
    /// on `/tmp`.
    pub read_only: bool,
    /// The control socket of the agent to use; `None`: the host's agent
    /// (`$TESSERA_HOME/agent.sock`) if one runs, else a private one.
    pub agent: Option<PathBuf>,
}

/// The cold-start report (`tessera run --json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The image.
    pub image: String,
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    /// From the start to QEMU's launch.
    pub seconds_to_vm_start: f64,
    /// From the start to the guest starting the entrypoint.
    pub seconds_to_entrypoint: Option<f64>,
    /// From QEMU's launch to its end.
    pub seconds_in_vm: f64,
    /// From the start to the end.
    pub seconds_total: f64,
    /// The program's exit code (128 + signal if it was killed).
    pub exit_code: i32,
    /// Bytes of the disk.
    pub disk_bytes: u64,
    /// Bytes of the chunks fetched from below the memory cache.
    pub bytes_fetched: u64,
    /// Chunks served, by the tier that had them.
    pub chunks_fetched: BTreeMap<String, u64>,
    /// Whether a recorded profile was prefetched.
    pub profile: bool,
    /// Chunks of the profile prefetched, or recorded by this run.
    pub profile_chunks: usize,
    /// From the start to the program's first output.
    pub seconds_to_first_output: Option<f64>,
    /// `shared` (the host's agent) or `private` (one started for this run).
    pub agent: &'static str,
    /// `vhost-user` or `nbd`.
    pub disk: &'static str,
    /// `built` (on microvm) or `debian` (on q35).
    pub kernel: &'static str,
}

/// The agent serving a run's disk: the host's, over its control socket,
/// or one of the run's own, in this process.
enum RunAgent {
    /// The control socket of the host's agent: connected per request, so
    /// a run holds no connection while its VM runs.
    Shared(PathBuf),
    Private(Background),
}

impl RunAgent {
    fn attach(&mut self, export: &str, disk: DiskKind, profile: ProfileMode) -> Result<Attached, Error> {
        match self {
            RunAgent::Shared(path) => control::Client::connect(path)
                .and_then(|mut c| c.attach(export, disk, profile))
                .map_err(|e| Error::Qemu(format!("the agent at {}: {e}", path.display()))),
            RunAgent::Private(b) => Ok(b.agent().attach(export, disk, profile)?),
        }
    }

    /// Detaches; a shared agent that is restarting is waited for (10 s).
    fn detach(&mut self, export: &str, until: Option<Duration>) -> Result<Detached, Error> {
        match self {
            RunAgent::Private(b) => Ok(b.agent().detach(export, until, true)?),
            RunAgent::Shared(path) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(mut c) = control::Client::connect(path) {
                        return c.detach(export, until, true).map_err(|e| Error::Qemu(format!("the agent at {}: {e}", path.display())));
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Qemu(format!("the agent at {} is gone", path.display())));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            RunAgent::Shared(_) => "shared",
            RunAgent::Private(_) => "private",
        }
    }
}

/// Runs `options.image` in a microVM, on a private agent of `home` with
/// `agent` options (its frontends are this run's own socket).
pub fn run(home: &Home, mut agent: AgentOptions, mut options: RunOptions) -> Result<Report, Error> {
    let started = Instant::now();
    let (_, manifest) = home.manifest(&options.image)?;
    if let Some(bad) = options.env.iter().find(|e| !e.contains('=')) {
        return Err(Error::BadEnv(bad.clone()));
    }
    let mut spec = RunSpec::from_config(&manifest.config, &options.args, &options.env);
    spec.read_only = options.read_only;
    if spec.argv.is_empty() {
        return Err(Error::NoEntrypoint(options.image.clone()));
    }
    let kernel = Kernel::pick(&options.kernel_dir, options.kernel)?;
    if !options.guest.exists() {
        return Err(Error::Tool { command: options.guest.display().to_string(), reason: "missing: it is built with tessera (cargo build)".into() });
    }

    let id = format!("run-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0));
    let dir = home.root().join("run").join(&id);
    std::fs::create_dir_all(&dir).map_err(Error::io("creating the run directory", &dir))?;
    let _cleanup = Cleanup(vec![dir.clone()]);
    let initrd = dir.join("initrd");
    let image = crate::build_initramfs(&options.guest, &kernel, &spec)?;
    std::fs::write(&initrd, image).map_err(Error::io("writing", &initrd))?;

    // The host's agent if one runs (the VMs of a host share its caches),
    // else one of this run's own, in-process. The VM writes to an overlay
    // of its own, removed afterwards.
    let shared = match &options.agent {
        Some(path) => Some(control::Client::connect(path).map_err(|e| Error::Qemu(format!("no agent answers at {}: {e}", path.display())))?),
        // A run in function trees reads through an agent of its own, which
        // joins the trees.
        None if agent.tree.is_some() => None,
        None => control::Client::connect(&home.root().join("agent.sock")).ok(),
    };
    let mut runner = match shared {
        Some(c) => RunAgent::Shared(c.path().to_owned()),
        None => {
            agent.frontends = vec![Frontend::Nbd(Listen::Unix(dir.join("nbd.sock")))];
            agent.vhost_user = Some(dir.join("vhost-user"));
            agent.control = None;
            RunAgent::Private(Background::start(Agent::new(home.clone(), agent)?)?)
        }
    };
    let agent_label = runner.label();
    let export = if options.read_only { options.image.clone() } else { format!("{}@{id}", options.image) };
    let attached = runner.attach(&export, options.disk, if options.profile { ProfileMode::Auto } else { ProfileMode::Off })?;
    let first_output = Arc::new(OnceLock::<Instant>::new());
    let attach_time = Instant::now();

    let accel = accel::pick(options.accel, &kernel, &options.kernel_dir);
    let console = dir.join("console.log");
    let sockets = [dir.join("stdout.sock"), dir.join("stderr.sock"), dir.join("control.sock")];
    let launch = Launch {
        kernel: &kernel.image,
        microvm: kernel.built,
        initrd: &initrd,
        root: match attached.disk {
            DiskKind::Nbd => RootDisk::Nbd { socket: attached.socket.clone(), export: attached.export.clone() },
            DiskKind::VhostUser => {
                RootDisk::VhostUser { socket: attached.socket.clone(), queues: options.cpus.clamp(1, tessera_agent::vhost::NUM_QUEUES as u32) }
            }
        },
        memory_mib: options.memory_mib,
        cpus: options.cpus,
        accel,
        sockets: sockets.clone(),
        console: (!options.console_to_stderr).then_some(console.as_path()),
    };
    let vm_started = Instant::now();
    let vm = (|| -> Result<_, Error> {
        let mut qemu = launch.spawn()?;
        let seconds_to_vm_start = started.elapsed().as_secs_f64();
        let connected = (|| Ok::<_, Error>((connect(&sockets[0], &mut qemu)?, connect(&sockets[1], &mut qemu)?, connect(&sockets[2], &mut qemu)?)))();
        let (out, err, control) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        };
        let out_t = forward(out, std::mem::replace(&mut options.stdout, Box::new(std::io::sink())), first_output.clone());
        let err_t = forward(err, std::mem::replace(&mut options.stderr, Box::new(std::io::sink())), first_output.clone());
        let control_t = std::thread::spawn(move || {
            let mut entry = None;
            let mut code = None;
            for line in BufReader::new(control).lines() {
                let Ok(line) = line else { break };
                let line = line.trim().to_owned();
                if line == "start" {
                    entry = Some(Instant::now());
                } else if let Some(c) = line.strip_prefix("exit ") {
                    code = c.parse::<i32>().ok();
                }
            }
            (entry, code)
        });
        let status = qemu.wait().map_err(|e| Error::Qemu(e.to_string()))?;
        let (entry, code) = control_t.join().expect("the control reader does not panic");
        let _ = out_t.join();
        let _ = err_t.join();
        Ok((status, entry, code, seconds_to_vm_start))
    })();
    let seconds_total = started.elapsed().as_secs_f64();
    // Detached however the VM ended. The profile: what was read until the
    // first output (or the end).
    let until = first_output.get().copied().unwrap_or_else(Instant::now).saturating_duration_since(attach_time);
    let detached = runner.detach(&export, Some(until));
    if let RunAgent::Private(b) = runner {
        b.stop()?;
    }
    let (status, entry, code, seconds_to_vm_start) = vm?;
    let detached = detached?;
    let beyond_memory: u64 = detached.chunks_fetched.iter().filter(|(t, _)| t.as_str() != "memory").map(|(_, n)| n).sum();
    let Some(exit_code) = code else {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let qemu_log = std::fs::read_to_string(console.with_extension("qemu")).unwrap_or_default();
        return Err(Error::NoExitCode {
            status: status.to_string(),
            qemu: if qemu_log.trim().is_empty() { String::new() } else { format!("qemu said: {}; ", qemu_log.trim()) },
            console: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    };
    Ok(Report {
        image: options.image,
        accel: accel.name(),
        seconds_to_vm_start,
        seconds_to_entrypoint: entry.map(|e| e.duration_since(started).as_secs_f64()),
        seconds_in_vm: vm_started.elapsed().as_secs_f64(),
        seconds_total,
        exit_code,
        disk_bytes: manifest.geometry.disk_bytes,
        bytes_fetched: beyond_memory * CHUNK_SIZE as u64,
        chunks_fetched: detached.chunks_fetched,
        profile: attached.prefetching,
        profile_chunks: if attached.prefetching { attached.profile_chunks } else { detached.profile_recorded },
        seconds_to_first_output: first_output.get().map(|t| t.duration_since(started).as_secs_f64()),
        agent: agent_label,
        disk: attached.disk.label(),
        kernel: if kernel.built { "built" } else { "debian" },
    })
}

/// Connects to a serial socket QEMU created, waiting for it to appear.
fn connect(path: &Path, qemu: &mut std::process::Child) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Some(status) = qemu.try_wait().map_err(|e| Error::Qemu(e.to_string()))? {
            return Err(Error::Qemu(format!("exited ({status}) before the VM started; rerun with --verbose")));
        }
        if Instant::now() > deadline {
            return Err(Error::Qemu(format!("did not open {}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Copies a serial stream to `sink` until it ends, noting the first output.
fn forward(mut from: UnixStream, mut sink: Box<dyn Write + Send>, first_output: Arc<OnceLock<Instant>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n > 0 {
                first_output.get_or_init(Instant::now);
            }
            if n == 0 || sink.write_all(&buf[..n]).and_then(|()| sink.flush()).is_err() {
                break;
            }
        }
    })
}

/// Removes paths when the run ends, however it ends.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
