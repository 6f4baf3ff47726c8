//! The microVM-native worker under TCG: vhost-user-blk disks served by one
//! agent per host, reached over its control socket; VMs that outlive an
//! agent killed with SIGKILL, and an agent that takes over from another.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::oci::{Blob, Comp};
use common::*;

fn run(env: &Env, args: &[&str]) -> Output {
    tessera_run(&env.home(), args).output().expect("tessera runs")
}

/// The `--json` report: the last line of stdout.
fn report(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|_| panic!("no report:\n{}", text(o)))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `tessera run` in the background, its stdout read line by line.
struct Running {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Running {
    fn start(env: &Env, args: &[&str]) -> Running {
        let mut child = tessera_run(&env.home(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("tessera runs");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Running { child, lines, seen: Vec::new() }
    }

    /// The next line of the program's output.
    fn line(&mut self) -> String {
        let Some(line) = self.lines.next() else {
            let mut err = String::new();
            std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended early after {:?}:\n{err}", self.seen)
        };
        let line = line.unwrap();
        self.seen.push(line.clone());
        line
    }

    /// Waits for the run to end: (exit code, every line, stderr).
    fn finish(mut self) -> (Option<i32>, Vec<String>, String) {
        for line in self.lines.by_ref() {
            self.seen.push(line.unwrap());
        }
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let status = self.child.wait().unwrap();
        (status.code(), self.seen, err)
    }
}

/// A root-run image: busybox and 16 MiB of data at /data, entrypoint `sh -c`.
fn data_image(env: &Env) -> String {
    let dir = env.path("data-layout");
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let data = pseudo_random(16 << 20, 7);
    let sum = format!("{:x}", md5_of(&data));
    let mut tar = tar::Builder::new(Vec::new());
    for (path, mode, bytes) in [("bin/busybox", 0o755, &busybox[..]), ("data", 0o644, &data[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(bytes.len() as u64);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, bytes).unwrap();
    }
    for dir in ["proc", "sys", "dev", "tmp"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, dir, &[][..]).unwrap();
    }
    let layer = Blob::from_tar(&tar.into_inner().unwrap(), Comp::Gzip);
    let d = common::oci::write_manifest(&dir, &[layer], &["/bin/busybox", "sh", "-c"]);
    common::oci::write_index(&dir, vec![(d, "t")]);
    env.import(&format!("oci:{}:t", dir.display()), "data", &[]);
    sum
}

fn md5_of(data: &[u8]) -> u128 {
    let mut child = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), data).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    u128::from_str_radix(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap(), 16).unwrap()
}

/// Reads /data from the disk `rounds` times, dropping the guest's page
/// cache before each, so every round's reads reach the agent; writes a
/// file first and reads it back from the disk last.
fn reader_script(rounds: u32) -> String {
    format!(
        "echo kept > /written; sync; i=0; while [ $i -lt {rounds} ]; do echo 3 > /proc/sys/vm/drop_caches; busybox md5sum /data; i=$((i+1)); done; \
         echo 3 > /proc/sys/vm/drop_caches; busybox cat /written"
    )
}

/// Waits for a VM running [`reader_script`] of 12 rounds: every round read
/// `sum`, the write made before the agent changed is read back, and the
/// guest saw no I/O error.
fn read_through(vm: Running, sum: &str) {
    let (code, lines, err) = vm.finish();
    assert_eq!(code, Some(0), "{lines:?}\n{err}");
    assert_eq!(lines.len(), 13, "{lines:?}\n{err}");
    assert!(lines[..12].iter().all(|l| *l == format!("{sum}  /data")), "{lines:?}");
    assert_eq!(lines[12], "kept", "the write acknowledged before the agent changed is read back after");
    assert!(!err.contains("I/O error"), "{err}");
}

fn kill9(pid: u32) {
    // SAFETY: kill takes a pid and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn a_read_only_root_refuses_writes_and_runs_default_to_vhost_user() {
    if !have_vm_tools() {
        return;
    }
    let env = Env::new();
    busybox_layout(&env.path("layout"), "bb");
    env.import(&format!("oci:{}:bb", env.path("layout").display()), "bb", &[]);
    let script = "echo x > /tmp/x && echo wrote; cat /sys/block/vda/queue/max_segment_size /sys/block/vda/queue/max_segments";
    let o = run(&env, &["bb", "--accel", "tcg", "--json", "--", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = report(&o);
    assert_eq!((r["disk"].as_str(), r["agent"].as_str()), (Some("vhost-user"), Some("private")), "{r}");
    // The device's request bound, as the guest's kernel took it: 126
    // segments of at most 32 KiB, never more than the 4 MiB it serves.
    let lines: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
    assert_eq!(lines[..3], ["wrote", "32768", "126"], "{}", text(&o));

    let script = "echo x > /etc/greeting 2>/dev/null || echo refused; echo t > /tmp/t && cat /tmp/t; cat /etc/greeting";
    let o = run(&env, &["bb", "--accel", "tcg", "--read-only", "--", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "refused\nt\nhello from tessera\n", "{}", text(&o));
    env.ok(&["verify", "bb"]);
}

#[test]
fn a_shared_agent_serves_concurrent_runs_from_its_caches() {
    if !have_vm_tools() {
        return;
    }
    let env = Env::new();
    let sum = data_image(&env);
    let agent = Served::start(&env, &[]);
    let script = "busybox md5sum /data; busybox sleep 3";
    let mut first = Running::start(&env, &["data", "--accel", "tcg", "--json", "--", script]);
    assert_eq!(first.line(), format!("{sum}  /data"));
    // The first VM has read everything the second will: the second reads
    // from the agent's memory.
    let second = run(&env, &["data", "--accel", "tcg", "--json", "--", script]);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    let r = report(&second);
    assert_eq!(r["agent"], "shared", "{r}");
    assert_eq!(r["chunks_fetched"]["origin"], 0, "the second run reads no chunk from the origin: {r}");
    assert!(r["chunks_fetched"]["memory"].as_u64().unwrap() > 0, "{r}");
    let (code, lines, err) = first.finish();
    assert_eq!(code, Some(0), "{err}");
    let r: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(r["chunks_fetched"]["origin"].as_u64().unwrap() >= 32, "the first run read /data from the origin: {r}");
    agent.stop();
}

/// Kills the agent with SIGKILL mid-run and starts it again: the VM carries
/// on with the right output, and its acknowledged write is kept.
#[test]
fn a_vm_outlives_its_agent_killed_and_restarted() {
    if !have_vm_tools() {
        return;
    }
    let env = Env::new();
    let sum = data_image(&env);
    let agent = Served::start(&env, &[]);
    let script = reader_script(12);
    let mut vm = Running::start(&env, &["data", "--accel", "tcg", "--", &script]);
    assert_eq!(vm.line(), format!("{sum}  /data"));
    kill9(agent.pid());
    drop(agent);
    let restarted = Instant::now();
    let agent = Served::start(&env, &[]);
    assert!(restarted.elapsed() < Duration::from_secs(2), "the agent restarts within 2 s");
    read_through(vm, &sum);
    agent.stop();
}

/// A new agent takes over the sockets of the running one (`--takeover`);
/// the old one stops; the VM does not notice.
#[test]
fn a_new_agent_takes_over_with_no_vm_noticing() {
    if !have_vm_tools() {
        return;
    }
    let env = Env::new();
    let sum = data_image(&env);
    let mut old = Served::start(&env, &[]);
    let script = reader_script(12);
    let mut vm = Running::start(&env, &["data", "--accel", "tcg", "--", &script]);
    assert_eq!(vm.line(), format!("{sum}  /data"));
    let new = Served::start(&env, &["--takeover"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !old.has_exited() {
        assert!(Instant::now() < deadline, "the old agent stops after handing over");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(old);
    assert_eq!(vm.line(), format!("{sum}  /data"));
    read_through(vm, &sum);
    // The new agent answers on the control socket the old one had.
    let after = run(&env, &["data", "--accel", "tcg", "--json", "--", "busybox true"]);
    assert_eq!(report(&after)["agent"], "shared", "{}", text(&after));
    new.stop();
}

/// One JSON line to the agent's control socket; its answer.
fn control(env: &Env, request: serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(env.home().join("agent.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// An agent killed with SIGKILL and started again serves the disks of the
/// runs still alive, and detaches (dropping its overlay) the disk of a run
/// that is gone: no disk is served forever for a VM that will never come.
#[test]
fn a_restarted_agent_drops_the_disks_of_runs_that_are_gone() {
    if !have_image_tools() {
        return;
    }
    let env = Env::new();
    busybox_layout(&env.path("layout"), "bb");
    env.import(&format!("oci:{}:bb", env.path("layout").display()), "bb", &[]);
    let agent = Served::start(&env, &[]);
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let alive = std::process::id();
    for (export, owner) in [("bb@alive", alive), ("bb@gone", gone_pid)] {
        let a = control(&env, serde_json::json!({"op": "attach", "export": export, "disk": "vhost-user", "owner": owner}));
        assert_eq!(a["ok"], true, "{a}");
    }
    let overlays = env.home().join("cache").join("overlays");
    kill9(agent.pid());
    drop(agent);
    let agent = Served::start(&env, &[]);
    let status = control(&env, serde_json::json!({"op": "status"}));
    assert_eq!(status["attached"], serde_json::json!(["bb@alive"]), "{status}");
    let left: Vec<String> =
        std::fs::read_dir(&overlays).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    assert!(!left.iter().any(|n| n.contains("gone")), "the gone run's overlay was dropped: {left:?}");
    assert_eq!(control(&env, serde_json::json!({"op": "detach", "export": "bb@alive", "discard": true}))["ok"], true);
    agent.stop();
}
