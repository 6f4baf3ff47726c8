//! Least-privilege roles on a real S3 and KMS (moto, with IAM checks on):
//! the policies of docs/policies/ given to one user per role. An importer
//! imports but cannot read a chunk or a manifest; a worker reads its
//! tenant's images and can write nothing; a worker of tenant A cannot open
//! tenant B's manifest (the key service refuses); only the collector and an
//! administrator delete.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};

use common::s3::{moto_python, Moto};
use common::*;

struct Roles {
    moto: Moto,
    url: String,
    kms: String,
    users: HashMap<String, (String, String)>,
}

fn setup() -> Option<Roles> {
    let moto = Moto::start_for_iam()?;
    let endpoint = format!("http://{}", moto.addr);
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policies");
    let out = run(Command::new(moto_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/iam_setup.py"))
        .args([&endpoint, "roles", "tessera", policies]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let users =
        v["users"].as_object().unwrap().iter().map(|(k, u)| (k.clone(), (u[0].as_str().unwrap().to_owned(), u[1].as_str().unwrap().to_owned()))).collect();
    let url = format!("s3://roles/tessera?endpoint={endpoint}&region=us-east-1");
    let kms = format!("kms://{}?endpoint={endpoint}&region=us-east-1", v["key_id"].as_str().unwrap());
    Some(Roles { moto, url, kms, users })
}

impl Roles {
    /// `tessera ARGS` on host `env` with `role`'s credentials (a worker
    /// reads for its tenant only).
    fn tessera(&self, env: &Env, role: &str, args: &[&str]) -> Output {
        let (id, secret) = &self.users[role];
        let keyring = match role.strip_prefix("worker-") {
            Some(tenant) => format!("{}&tenant={tenant}", self.kms),
            None => self.kms.clone(),
        };
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .env("TESSERA_HOME", env.home())
            .env("TESSERA_STORE", &self.url)
            .env("TESSERA_KEYRING", keyring)
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, env: &Env, role: &str, args: &[&str]) -> String {
        let out = self.tessera(env, role, args);
        assert!(out.status.success(), "{role}: tessera {args:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn denied(&self, env: &Env, role: &str, args: &[&str]) -> String {
        let out = self.tessera(env, role, args);
        assert!(!out.status.success(), "{role} may not: tessera {args:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A store client with `role`'s credentials, in this process.
    fn store(&self, role: &str) -> tessera_store::Store {
        let (id, secret) = &self.users[role];
        std::env::set_var("AWS_ACCESS_KEY_ID", id);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
        tessera_store::Store::open(&tessera_store::StoreUrl::parse(&self.url).unwrap()).unwrap()
    }
}

fn have_tools() -> bool {
    have_image_tools() && require("nbdcopy", "libnbd-bin")
}

#[test]
fn each_role_can_do_its_job_and_nothing_else() {
    if !have_tools() {
        return;
    }
    let Some(roles) = setup() else { return };
    let (importer, worker, collector, admin) = (Env::new(), Env::new(), Env::new(), Env::new());
    let layout = importer.path("layout");
    busybox_layout(&layout, "bb");
    add_layer(&layout, "bb", "data", &[("data/blob", &pseudo_random(2 << 20, 5))]);
    let src = format!("oci:{}:data", layout.display());

    // Set-up: the salt, made by the key service and kept wrapped in the store.
    let said = roles.ok(&admin, "admin", &["keyring", "init"]);
    assert!(said.contains("kms://"), "{said}");
    assert!(!admin.home().join("keyring.json").exists(), "no key material on the host");

    // The importer imports, for two tenants.
    for (name, tenant) in [("app-a", "a"), ("app-b", "b")] {
        roles.ok(&importer, "importer", &["import", &src, "--name", name, "--tenant", tenant, "--headroom", "64MiB"]);
    }
    // ... but reads no manifest, no chunk, no listing.
    let err = roles.denied(&importer, "importer", &["verify", "app-a"]);
    assert!(err.contains("read manifest") && err.contains("access denied"), "{err}");
    let err = roles.denied(&importer, "importer", &["images"]);
    assert!(err.contains("access denied"), "{err}");
    let chunks = roles.store("admin").chunks(0).list().unwrap();
    assert!(!chunks.is_empty());
    let e = roles.store("importer").chunks(0).get(&chunks[0]).unwrap_err().to_string();
    assert!(e.contains("read chunk") && e.contains("access denied"), "{e}");
    // ... and deletes nothing: a name is removed by an administrator.
    let err = roles.denied(&importer, "importer", &["rm", "app-b"]);
    assert!(err.contains("access denied"), "{err}");

    // A worker of tenant a reads a's image, and serves it.
    roles.ok(&worker, "worker-a", &["verify", "app-a"]);
    let listed = roles.ok(&worker, "worker-a", &["images", "--json"]);
    assert!(listed.contains("app-a"), "{listed}");
    // b's manifest: the key service refuses, and the worker says so.
    let err = roles.denied(&worker, "worker-a", &["verify", "app-b"]);
    assert!(err.contains("tenant \"b\"") && err.contains("tenant \"a\" only") && err.contains("InvalidCiphertext"), "{err}");
    // It writes nothing.
    for args in
        [vec!["import", &src, "--name", "sneaky", "--tenant", "a"], vec!["rm", "app-a"], vec!["gc", "--grace", "0s", "--lease", "0s", "--rotate-after", "0s"]]
    {
        let err = roles.denied(&worker, "worker-a", &args);
        assert!(err.contains("access denied"), "{args:?}: {err}");
    }
    let e = roles.store("worker-a").chunks(0).put(&tessera_chunk::ChunkId::of(b"junk"), b"junk").unwrap_err().to_string();
    assert!(e.contains("access denied"), "{e}");

    // The collector collects (and needs no key at all).
    roles.ok(&admin, "admin", &["rm", "app-b"]);
    let mut last = serde_json::Value::Null;
    for _ in 0..3 {
        let out = roles.ok(&collector, "gc", &["gc", "--json", "--grace", "0s", "--lease", "0s", "--rotate-after", "0s"]);
        last = serde_json::from_str(&out).unwrap();
    }
    assert_eq!(last["step"], "deleted", "{last}");
    assert_eq!(last["live_images"], 1);
    // a still reads, from its new generation; b's chunks are gone.
    roles.ok(&worker, "worker-a", &["verify", "app-a"]);
    let served_home = Env::new();
    let socket = served_home.path("nbd.sock");
    let (id, secret) = &roles.users["worker-a"];
    let ready = served_home.path("ready.json");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--nbd", &format!("unix:{}", socket.display()), "--ready-file", ready.to_str().unwrap()])
        .env("TESSERA_HOME", served_home.home())
        .env("TESSERA_STORE", &roles.url)
        .env("TESSERA_KEYRING", format!("{}&tenant=a", roles.kms))
        .env("AWS_ACCESS_KEY_ID", id)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&ready, &mut serve, "tessera serve");
    let out = served_home.path("a.raw");
    run(Command::new("nbdcopy").arg(format!("nbd+unix:///app-a?socket={}", socket.display())).arg(&out));
    let want = importer.path("want.raw");
    roles.ok(&admin, "admin", &["export", "app-a", want.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&want).unwrap(), "the worker serves a's image");
    stop_child(&mut serve, std::time::Duration::from_secs(20));
    drop(roles.moto);
}
