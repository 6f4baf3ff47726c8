//! The S3 backend against a real S3-compatible server on loopback
//! (`moto_server`, from `pip install 'moto[server]'`): the same conformance
//! suites as every other backend.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_chunk::ChunkId;
use tessera_store::{conformance, Put, Store, StoreUrl};

/// A moto server on a port it picked; killed on drop.
struct Moto {
    child: Child,
    addr: String,
    _log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts moto, or `None` (a failure under CI) when it is not installed.
    fn start() -> Option<Moto> {
        let program = std::env::var("TESSERA_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        if Command::new(&program).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "moto_server is missing: pip install 'moto[server]' (scripts/test.sh does)");
            eprintln!("skipping: moto_server is missing (pip install 'moto[server]')");
            return None;
        }
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child =
            Command::new(&program).args(["-H", "127.0.0.1", "-p", "0"]).stdout(log.reopen().unwrap()).stderr(log.reopen().unwrap()).spawn().unwrap();
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
        Some(Moto { child, addr, _log: log })
    }

    /// Makes `bucket` and returns a store URL for it.
    fn bucket(&self, bucket: &str) -> String {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.write_all(format!("PUT /{bucket} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.addr).as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "creating the bucket: {answer}");
        format!("s3://{bucket}/tessera?endpoint=http://{}&region=us-east-1", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credentials() {
    // Any key works with moto unless IAM is enforced.
    std::env::set_var("AWS_ACCESS_KEY_ID", "tessera-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "tessera-test-secret");
}

fn store(url: &str) -> Store {
    credentials();
    Store::open(&StoreUrl::parse(url).unwrap()).unwrap()
}

#[test]
fn the_chunk_store_suite_passes_on_s3() {
    let Some(moto) = Moto::start() else { return };
    let s = store(&moto.bucket("chunks-suite"));
    conformance::run(s.chunks(0).as_ref());
    conformance::run_concurrent(s.chunks(0));
    conformance::run(s.chunks(5).as_ref());
}

#[test]
fn the_control_suite_passes_on_s3() {
    let Some(moto) = Moto::start() else { return };
    let s = store(&moto.bucket("control-suite"));
    conformance::run_control(s.control.clone());
}

#[test]
fn the_catalog_suite_passes_on_s3() {
    let Some(moto) = Moto::start() else { return };
    let s = store(&moto.bucket("catalog-suite"));
    conformance::run_catalog(s.catalog.as_ref());
    conformance::run_catalog_races(s.catalog.clone());
}

/// The server this suite runs against must let exactly one of many racing
/// creates win, or put-if-absent means nothing.
#[test]
fn exactly_one_of_many_racing_creates_wins() {
    let Some(moto) = Moto::start() else { return };
    let s = store(&moto.bucket("races"));
    for round in 0..5u8 {
        let bytes: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i as u8) ^ round).collect());
        let id = ChunkId::of(&bytes);
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (chunks, bytes) = (s.chunks(0), bytes.clone());
                std::thread::spawn(move || chunks.put(&id, &bytes).unwrap())
            })
            .collect();
        let created = threads.into_iter().map(|t| t.join().unwrap()).filter(|p| *p == Put::Created).count();
        assert_eq!(created, 1, "round {round}: {created} creates won");
        assert!(s.chunks(0).get(&id).unwrap()[..] == bytes[..]);
    }
}

#[test]
fn a_missing_bucket_and_a_dead_server_are_clear_errors() {
    let Some(moto) = Moto::start() else { return };
    let s = store(&format!("s3://no-such-bucket?endpoint=http://{}&region=us-east-1", moto.addr));
    let err = s.chunks(0).get(&ChunkId([1; 32])).unwrap_err().to_string();
    assert!(err.contains("no such bucket") && err.contains("s3://no-such-bucket"), "{err}");
    // Nothing listens here any more: an error naming the server, in bounded time.
    let addr = moto.addr.clone();
    drop(moto);
    let s = store(&format!("s3://gone?endpoint=http://{addr}&region=us-east-1"));
    let started = Instant::now();
    let err = s.chunks(0).get(&ChunkId([1; 32])).unwrap_err().to_string();
    assert!(err.contains(&addr) && err.contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "gave up after {:?}", started.elapsed());
}
