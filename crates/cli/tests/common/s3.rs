//! A real S3-compatible server on loopback for the tests: `moto_server`
//! (`pip install 'moto[server]'`; `scripts/test.sh` installs it in a venv).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto server on a port it picked; killed on drop.
pub struct Moto {
    child: Child,
    pub addr: String,
    log: tempfile::NamedTempFile,
}

/// The Python that runs `moto_server` (its venv's, beside it), which has boto3.
pub fn moto_python() -> String {
    let program = std::env::var("TESSERA_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let beside = std::path::Path::new(&program).with_file_name("python3");
    if beside.is_file() {
        beside.display().to_string()
    } else {
        "python3".into()
    }
}

/// `moto_server`, or `None` (a failure under CI) when it is not installed.
pub fn moto_program() -> Option<String> {
    let program = std::env::var("TESSERA_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    if Command::new(&program).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return Some(program);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "moto_server is missing: pip install 'moto[server]' (scripts/test.sh does)");
    eprintln!("skipping: moto_server is missing (pip install 'moto[server]')");
    None
}

impl Moto {
    /// Starts moto with extra environment (`INITIAL_NO_AUTH_ACTION_COUNT`
    /// turns IAM checks on), or `None` when it is not installed.
    pub fn start_with(env: &[(&str, &str)]) -> Option<Moto> {
        let program = moto_program()?;
        let mut cmd = Command::new(&program);
        cmd.envs(env.iter().copied());
        Some(Moto::spawn(cmd))
    }

    /// Starts moto through `fixtures/moto_iam.py` (its IAM signature check
    /// fixed for encoded query strings), for tests that turn IAM checks on.
    pub fn start_for_iam() -> Option<Moto> {
        moto_program()?;
        let mut cmd = Command::new(moto_python());
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto_iam.py"));
        Some(Moto::spawn(cmd))
    }

    fn spawn(mut cmd: Command) -> Moto {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = cmd.args(["-H", "127.0.0.1", "-p", "0"]).stdout(log.reopen().unwrap()).stderr(log.reopen().unwrap()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            if let Some(rest) = text.split("Running on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
            assert!(child.try_wait().unwrap().is_none(), "moto_server exited:\n{text}");
            assert!(Instant::now() < deadline, "moto_server did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        Moto { child, addr, log }
    }

    pub fn start() -> Option<Moto> {
        Moto::start_with(&[])
    }

    /// Makes `bucket`; returns a store URL for it (`extra`: more parameters).
    pub fn bucket(&self, bucket: &str, extra: &str) -> String {
        let answer = self.raw("PUT", &format!("/{bucket}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "creating the bucket: {answer}");
        format!("s3://{bucket}/tessera?endpoint=http://{}&region=us-east-1{extra}", self.addr)
    }

    /// An unsigned request, as moto takes them without IAM.
    pub fn raw(&self, method: &str, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.addr).as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    /// Keys under `prefix` in `bucket`.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let answer = self.raw("GET", &format!("/{bucket}?list-type=2&prefix={prefix}&max-keys=1000"));
        answer.split("<Key>").skip(1).map(|k| k.split("</Key>").next().unwrap().to_owned()).collect()
    }

    /// Requests moto logged whose line contains `what` (e.g. `"PUT /b/tessera/chunks/`).
    pub fn requests(&self, what: &str) -> usize {
        std::fs::read_to_string(self.log.path()).unwrap_or_default().lines().filter(|l| l.contains(what)).count()
    }

    /// Pauses the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points the `tessera` processes this test starts at `url`, with
/// credentials moto takes.
pub fn use_store(url: &str) {
    std::env::set_var("TESSERA_STORE", url);
    std::env::set_var("AWS_ACCESS_KEY_ID", "tessera-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "tessera-test-secret");
}
