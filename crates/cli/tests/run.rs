//! `tessera run` under TCG: a real kernel and QEMU, the image's root served
//! lazily by the in-process agent.

mod common;

use std::process::Output;

use common::*;

fn run(env: &Env, args: &[&str]) -> Output {
    tessera_run(&env.home(), args).output().expect("tessera runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn imported() -> Env {
    let env = Env::new();
    let layout = env.path("layout");
    busybox_layout(&layout, "bb");
    env.import(&format!("oci:{}:bb", layout.display()), "bb", &[]);
    env
}

#[test]
fn the_entrypoint_runs_with_the_image_config() {
    if !have_vm_tools() {
        return;
    }
    let env = imported();
    let o = run(&env, &["bb", "--accel", "tcg"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "hello from tessera\n", "only the program's output reaches stdout");

    // A command in place of cmd, the image's env plus --env, its workdir and user.
    let o = run(&env, &["bb", "--accel", "tcg", "--env", "FOO=bar", "--", "-c", "echo \"$GREETING $FOO\"; pwd; /bin/busybox id -u; echo oops >&2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "hello bar\n/etc\n1000\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"), "{}", text(&o));

    // An image without PATH gets docker's default, in the program's environment too.
    let o = run(&env, &["bb", "--accel", "tcg", "--", "-c", "echo \"$PATH\""]);
    assert_eq!(stdout(&o), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n", "{}", text(&o));

    // The cold-start report.
    let o = run(&env, &["bb", "--accel", "tcg", "--json", "--", "-c", "exit 0"]);
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("--json prints one object");
    for key in ["seconds_to_vm_start", "seconds_to_entrypoint", "seconds_total", "exit_code", "disk_bytes", "bytes_fetched", "chunks_fetched", "profile"] {
        assert!(report.get(key).is_some(), "report lacks {key}: {report}");
    }
    assert!(report["bytes_fetched"].as_u64().unwrap() < report["disk_bytes"].as_u64().unwrap() / 10, "lazy: {report}");
}

#[test]
fn exit_codes_and_crashes_are_propagated() {
    if !have_vm_tools() {
        return;
    }
    let env = imported();
    assert_eq!(run(&env, &["bb", "--accel", "tcg", "--", "-c", "exit 3"]).status.code(), Some(3));
    assert_eq!(run(&env, &["bb", "--accel", "tcg", "--", "-c", "kill -SEGV $$"]).status.code(), Some(139));
    // Debian's kernel on q35 (serial ports, PCI), over NBD: the other path.
    let o = run(&env, &["bb", "--accel", "tcg", "--kernel", "debian", "--disk", "nbd", "--json", "--", "-c", "exit 4"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(report["disk"], "nbd");
}

#[test]
fn runs_are_private_and_the_image_never_changes() {
    if !have_vm_tools() {
        return;
    }
    let env = imported();
    let script = |v: &str| format!("echo {v} > /tmp/x; sleep 1; cat /tmp/x");
    let (sa, sb) = (script("A"), script("B"));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(&env, &["bb", "--accel", "tcg", "--disk", "nbd", "--", "-c", &sa]));
        let b = s.spawn(|| run(&env, &["bb", "--accel", "tcg", "--", "-c", &sb]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(stdout(&a), "A\n", "{}", text(&a));
    assert_eq!(stdout(&b), "B\n", "{}", text(&b));
    let c = run(&env, &["bb", "--accel", "tcg", "--", "-c", "cat /tmp/x 2>/dev/null || echo none"]);
    assert_eq!(stdout(&c), "none\n", "a later run sees neither run's writes");
    env.ok(&["verify", "bb"]);
    let overlays = env.home().join("cache/overlays");
    assert_eq!(std::fs::read_dir(&overlays).map(|d| d.count()).unwrap_or(0), 0, "run overlays are removed");
}

#[test]
fn a_missing_entrypoint_is_a_clear_error() {
    if !have_vm_tools() {
        return;
    }
    let env = Env::new();
    let dir = env.path("noentry");
    // A layer with a shell but no /bin/app, the entrypoint the config names.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    common::oci::layout(&dir, "t", &[common::oci::Blob::from_tar(&common::oci::tar_of(&[("bin/", b""), ("bin/busybox", &busybox)]), common::oci::Comp::Gzip)]);
    env.import(&format!("oci:{}:t", dir.display()), "noentry", &[]);
    let o = run(&env, &["noentry", "--accel", "tcg"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/bin/app: not found"), "{}", text(&o));
}

#[test]
fn a_start_up_profile_is_recorded_then_prefetched() {
    if !have_vm_tools() {
        return;
    }
    let env = imported();
    let report = |o: &Output| -> serde_json::Value {
        assert_eq!(o.status.code(), Some(0), "{}", text(o));
        serde_json::from_str(stdout(o).lines().last().unwrap()).unwrap()
    };
    let first = report(&run(&env, &["bb", "--accel", "tcg", "--json"]));
    assert_eq!(first["profile"], false);
    assert!(first["profile_chunks"].as_u64().unwrap() > 0, "{first}");
    let shown: serde_json::Value = serde_json::from_str(&env.ok(&["profile", "bb", "--json"])).unwrap();
    assert_eq!(shown["chunks"].as_array().unwrap().len() as u64, first["profile_chunks"].as_u64().unwrap());
    let second = report(&run(&env, &["bb", "--accel", "tcg", "--json"]));
    assert_eq!(second["profile"], true, "the second run prefetches the profile: {second}");
    let without = report(&run(&env, &["bb", "--accel", "tcg", "--json", "--no-profile"]));
    assert_eq!(without["profile"], false);
}
