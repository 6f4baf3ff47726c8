//! `tessera run`: the agent in-process, a microVM on its export, the
//! program's streams forwarded, and a cold-start report.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tessera_agent::{Agent, Listen};
use tessera_cache::Tier;
use tessera_store::Home;
use tessera_vm::{Accel, Kernel, Launch, RunSpec};

use crate::commands::{agent_options, bound_allocator};
use crate::flags::RunArgs;

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

/// KVM only when /dev/kvm exists and a probe VM (the kernel alone, which
/// panics and stops at once) exits within a few seconds: nested KVM on some
/// hosts opens but hangs.
/// The probe's answer is kept beside the kernel for this boot of the host.
fn pick_accel(wanted: &str, kernel: &Kernel) -> Accel {
    match wanted {
        "kvm" => return Accel::Kvm,
        "tcg" => return Accel::Tcg,
        _ if !Path::new("/dev/kvm").exists() => return Accel::Tcg,
        _ => {}
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let memo = kernel_dir().join("accel-probe");
    if let Some(answer) = std::fs::read_to_string(&memo).ok().and_then(|m| m.strip_prefix(boot.trim()).map(|a| a.trim().to_owned())) {
        return if answer == "kvm" { Accel::Kvm } else { Accel::Tcg };
    }
    let answer = probe_kvm(kernel);
    let _ = std::fs::write(&memo, format!("{} {}\n", boot.trim(), answer.name()));
    answer
}

fn probe_kvm(kernel: &Kernel) -> Accel {
    let child = std::process::Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-M", "q35", "-nodefaults", "-no-reboot", "-display", "none", "-m", "128"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .args(["-append", "panic=-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return Accel::Tcg };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Accel::Kvm,
            Ok(Some(_)) => return Accel::Tcg,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Accel::Tcg;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connects to a serial socket QEMU created, waiting for it to appear.
fn connect(path: &Path, qemu: &mut std::process::Child) -> Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Some(status) = qemu.try_wait()? {
            bail!("qemu exited ({status}) before the VM started; rerun with --verbose");
        }
        if Instant::now() > deadline {
            bail!("qemu did not open {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run(home: Home, a: RunArgs) -> Result<ExitCode> {
    bound_allocator();
    let started = Instant::now();
    let (image_ref, manifest) = home.manifest(&a.name)?;
    let keyring = home.keyring()?;
    let profile = match a.no_profile {
        true => None,
        false => home.catalog.get_profile(&image_ref.manifest)?.and_then(|s| s.open_profile(&keyring).ok()),
    };
    for e in &a.env {
        if !e.contains('=') {
            bail!("--env {e:?}: use KEY=VALUE");
        }
    }
    let spec = RunSpec::from_config(&manifest.config, &a.args, &a.env);
    if spec.argv.is_empty() {
        bail!("{}: the image has no entrypoint or cmd; give one after --", a.name);
    }
    let kernel = Kernel::ensure(&kernel_dir())?;
    let guest = std::env::current_exe()?.with_file_name("tessera-guest");
    if !guest.exists() {
        bail!("{} is missing: it is built with tessera (cargo build)", guest.display());
    }

    let id = format!("run-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
    let dir = home.root().join("run").join(&id);
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(vec![dir.clone()]);
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, tessera_vm::build_initramfs(&guest, &kernel, &spec)?)?;

    // The agent, in-process, on a socket of this run's own.
    let socket = dir.join("nbd.sock");
    let options = agent_options(&home, vec![Listen::Unix(socket.clone())], None, crate::flags::LimitArgs::default(), a.cache)?;
    let overlays = options.cache_dir.join("overlays");
    let agent = Arc::new(Agent::new(Home::open(home.root())?, options).context("starting the agent")?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(agent.clone().run(
        |_| {},
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline || serving.is_finished() {
            bail!("the agent did not start on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let export = format!("{}@{id}", a.name);
    let _overlay = Cleanup(vec![overlays.join(&export)]);

    // With a profile, fetch what start-up will read while the VM boots;
    // without one, record it.
    let disk = agent.exports.disk(&a.name).map_err(anyhow::Error::msg)?;
    let prefetch_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prefetchers: Vec<_> = match &profile {
        Some(p) => {
            let queue = Arc::new(std::sync::Mutex::new(p.chunks.clone().into_iter()));
            (0..8)
                .map(|_| {
                    let (queue, disk, stop) = (queue.clone(), disk.clone(), prefetch_stop.clone());
                    std::thread::spawn(move || loop {
                        let next = queue.lock().expect("no panics while holding the lock").next();
                        let Some(index) = next else { return };
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        if let Some(Some(r)) = disk.manifest().chunks.get(index as usize) {
                            let _ = disk.loader().read(r);
                        }
                    })
                })
                .collect()
        }
        None => {
            if !a.no_profile {
                disk.start_recording();
            }
            Vec::new()
        }
    };
    let first_output = Arc::new(std::sync::OnceLock::<Instant>::new());

    let accel = pick_accel(&a.accel, &kernel);
    let console = dir.join("console.log");
    let sockets = [dir.join("stdout.sock"), dir.join("stderr.sock"), dir.join("control.sock")];
    let launch = Launch {
        kernel: &kernel.vmlinuz,
        initrd: &initrd,
        nbd_socket: &socket,
        export: &export,
        memory_mib: a.memory,
        cpus: a.cpus,
        accel,
        sockets: sockets.clone(),
        console: (!a.verbose).then_some(console.as_path()),
    };
    let vm_started = Instant::now();
    let mut qemu = launch.spawn()?;
    let seconds_to_vm_start = started.elapsed().as_secs_f64();
    let out = connect(&sockets[0], &mut qemu)?;
    let err = connect(&sockets[1], &mut qemu)?;
    let control = connect(&sockets[2], &mut qemu)?;
    let forward = |mut from: UnixStream, to: fn() -> Box<dyn Write + Send>| {
        let first_output = first_output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            let mut sink = to();
            while let Ok(n) = from.read(&mut buf) {
                if n > 0 {
                    first_output.get_or_init(Instant::now);
                }
                if n == 0 || sink.write_all(&buf[..n]).and_then(|()| sink.flush()).is_err() {
                    break;
                }
            }
        })
    };
    let out_t = forward(out, || Box::new(std::io::stdout()));
    let err_t = forward(err, || Box::new(std::io::stderr()));
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
    let status = qemu.wait()?;
    let (entry, code) = control_t.join().expect("the control reader does not panic");
    let _ = out_t.join();
    let _ = err_t.join();
    let seconds_total = started.elapsed().as_secs_f64();
    prefetch_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in prefetchers {
        let _ = p.join();
    }
    // The profile: what was read until the first output (or the end, at most a minute in).
    let mut recorded = 0;
    if profile.is_none() && !a.no_profile {
        let until = first_output.get().copied().unwrap_or_else(Instant::now).min(started + Duration::from_secs(60));
        let chunks = disk.stop_recording(until);
        recorded = chunks.len();
        if !chunks.is_empty() {
            let p = tessera_chunk::Profile {
                format: tessera_chunk::MANIFEST_FORMAT,
                manifest: image_ref.manifest.clone(),
                chunks,
                recorded_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
                seconds: until.duration_since(started).as_secs_f64(),
            };
            home.catalog.put_profile(&image_ref.manifest, &p.seal(&image_ref.tenant, &keyring)?)?;
        }
    }
    let _ = stop.send(());
    let _ = runtime.block_on(serving);
    let stats = &agent.loader.stats;
    let fetched: serde_json::Map<String, serde_json::Value> =
        Tier::ALL.iter().map(|t| (t.label().to_owned(), json!(stats.reads(*t)))).collect();
    let chunks_beyond_memory: u64 = Tier::ALL.iter().filter(|t| **t != Tier::Memory).map(|t| stats.reads(*t)).sum();
    let Some(code) = code else {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let qemu_log = std::fs::read_to_string(console.with_extension("qemu")).unwrap_or_default();
        bail!(
            "the VM stopped ({status}) without reporting an exit code; {}its console ended with:\n{}",
            if qemu_log.trim().is_empty() { String::new() } else { format!("qemu said: {}; ", qemu_log.trim()) },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    };
    let report = json!({
        "image": a.name,
        "accel": accel.name(),
        "seconds_to_vm_start": seconds_to_vm_start,
        "seconds_to_entrypoint": entry.map(|e| e.duration_since(started).as_secs_f64()),
        "seconds_in_vm": vm_started.elapsed().as_secs_f64(),
        "seconds_total": seconds_total,
        "exit_code": code,
        "disk_bytes": manifest.geometry.disk_bytes,
        "bytes_fetched": chunks_beyond_memory * tessera_chunk::CHUNK_SIZE as u64,
        "chunks_fetched": fetched,
        "profile": profile.is_some(),
        "profile_chunks": profile.as_ref().map(|p| p.chunks.len()).unwrap_or(recorded),
        "seconds_to_first_output": first_output.get().map(|t| t.duration_since(started).as_secs_f64()),
    });
    if a.report {
        eprintln!(
            "tessera: {} ({}, {}): vm started {:.2} s, entrypoint {:.2} s, done {:.2} s, exit {code}; fetched {} of {} ({:.1}%)",
            a.name,
            accel.name(),
            match (&profile, recorded) {
                (Some(p), _) => format!("prefetched a profile of {} chunks", p.chunks.len()),
                (None, 0) => "no profile".to_owned(),
                (None, n) => format!("recorded a profile of {n} chunks"),
            },
            seconds_to_vm_start,
            report["seconds_to_entrypoint"].as_f64().unwrap_or(f64::NAN),
            seconds_total,
            crate::progress::human(chunks_beyond_memory * tessera_chunk::CHUNK_SIZE as u64),
            crate::progress::human(manifest.geometry.disk_bytes),
            100.0 * (chunks_beyond_memory * tessera_chunk::CHUNK_SIZE as u64) as f64 / manifest.geometry.disk_bytes as f64
        );
    }
    if a.json {
        println!("{report}");
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
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
