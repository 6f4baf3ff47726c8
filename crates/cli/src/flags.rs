//! Command-line flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Tessera loads container images on demand, block by block.
///
/// Images are flattened into one deterministic ext4 filesystem, cut into
/// 512 KiB chunks, sealed with convergent encryption and stored once each.
/// By default everything lives under TESSERA_HOME (default
/// ~/.local/share/tessera): no service needs to run. With --store s3://…,
/// chunks, manifests and names live in an S3-compatible bucket shared by
/// many hosts, and TESSERA_HOME keeps only this host's caches and state.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, propagate_version = true)]
pub struct Cli {
    /// This host's directory: caches, overlays, sockets, the keyring, and
    /// (unless --store says otherwise) the store itself.
    #[arg(long, env = "TESSERA_HOME", global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Where chunks, manifests and names live: file:DIR (default: the home)
    /// or s3://BUCKET[/PREFIX][?endpoint=URL&region=R&virtual_hosted=true],
    /// with credentials from the standard AWS variables (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    /// AWS_ENDPOINT_URL) or the shared files of AWS_PROFILE.
    #[arg(long, env = "TESSERA_STORE", global = true, value_name = "URL")]
    pub store: Option<String>,
    /// The keys that open the store's manifests: a keyring file (default
    /// $TESSERA_HOME/keyring.json; hosts sharing a store share a copy), or a
    /// key service, kms://KEY_ID[?endpoint=URL&region=R&tenant=T] (AWS KMS
    /// API, standard AWS variables; AWS_ENDPOINT_URL_KMS too): no master
    /// key on the host, and with tenant=T the host can read only tenant T's
    /// images.
    #[arg(long, env = "TESSERA_KEYRING", global = true, value_name = "FILE|URL")]
    pub keyring: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Import an image: fetch, verify, flatten to ext4, seal and store its chunks.
    ///
    /// SOURCE is spelled as skopeo spells it: oci:DIR[:TAG],
    /// docker-archive:FILE[:REPO:TAG] or docker://HOST[:PORT]/REPO[:TAG|@sha256:…].
    Import(ImportArgs),
    /// List imported images.
    Images {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's OCI config, disk geometry, chunk counts and source.
    Inspect {
        /// Image name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the plain ext4 image, rebuilt from the store chunk by chunk.
    ///
    /// Every chunk is checked against its id and opened with its key; a bad
    /// chunk stops the export and no file is left behind.
    Export {
        /// Image name.
        name: String,
        /// Output file (written sparse; appears only when complete).
        file: PathBuf,
    },
    /// Check every chunk of an image: present, matching its id, opening with its key.
    ///
    /// Exits 1 and names each bad chunk when any is bad.
    Verify {
        /// Image name.
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve every imported image as a lazy block device over NBD.
    ///
    /// Export NAME is the image, read-only; export NAME@LABEL is a writable
    /// copy-on-write view whose writes land in an overlay of its own (under
    /// the cache directory), kept across reconnects and restarts. Images
    /// imported while the agent runs are exported at once. Chunks are
    /// fetched on first read through a memory cache, a disk cache and the
    /// store, and checked before they are served.
    Serve(ServeArgs),
    /// Show an image as a file on a FUSE filesystem: DIR/NAME is the disk.
    ///
    /// Lets `mount -o loop` work where there is no nbd kernel module; --loop
    /// does that too. NAME@LABEL gives a writable copy-on-write view (the
    /// same overlay `tessera serve` uses). Runs until interrupted, then
    /// unmounts everything it mounted.
    Mount(MountArgs),
    /// Boot a microVM whose root disk is the image, served lazily, and run
    /// its entrypoint.
    ///
    /// Runs the OCI entrypoint + cmd (or ARGS in place of cmd, as `docker
    /// run IMAGE ARGS` does) with the image's env, workdir and user. The
    /// program's stdout and stderr stream to ours; tessera exits with its
    /// exit code. The VM writes to a copy-on-write overlay of its own, removed
    /// afterwards: the image never changes. The agent runs in-process. The
    /// guest kernel (Debian's linux-image-cloud-amd64) is fetched with apt
    /// the first time into $TESSERA_KERNEL_DIR (default ~/.cache/tessera/kernel).
    /// The first run records a start-up profile (the chunks read before the
    /// program's first output); later runs prefetch them while the VM boots.
    Run(RunArgs),
    /// Re-lay an image so the files its start reads come first: fewer chunks
    /// to fetch at start.
    ///
    /// Maps the blocks of the image's start-up profile (recorded by its
    /// first `tessera run`) to the files that hold them, then imports the
    /// image again from its source with those files together, in the order
    /// the start read them, at the end of each layer's data, right before
    /// the layer's metadata (so the start's files and metadata share chunks). The result has the same
    /// tree, and a profile moved with the files. Needs the source the image
    /// was imported from.
    Optimize(OptimizeArgs),
    /// Show an image's start-up profile: the chunks its first run read, in
    /// order, before the entrypoint's first output (later runs prefetch them).
    Profile {
        /// Image name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measurements behind docs/BENCHMARKS.md.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Simulate a fleet starting one function at once: a discrete-event
    /// model of VMs, NICs, the registry and the systems that move images
    /// (a full pull, on-demand fetches, Kraken's P2P, FaaSNet's function
    /// trees, Tessera's). Parameters and their sources: docs/SIMULATOR.md.
    Sim(SimArgs),
    /// Run a shared cache node: keeps erasure-coded stripes of sealed chunks
    /// for the agents of a zone (`--cache-nodes`), in memory and on disk.
    ///
    /// Stripes are ciphertext; the node never sees a chunk key. Both caches
    /// are bounded and evict by LRU-2; what is on disk is kept across
    /// restarts and checked (SHA-256) on every read. Answers HTTP/1.1 and
    /// cleartext HTTP/2 on /v1/stripes/CHUNK. Runs until interrupted.
    Cachenode(CachenodeArgs),
    /// Run the function-tree manager (FaaSNet): one balanced binary tree of
    /// agents per function; each agent learns its parent here and reads
    /// chunks from it before going below.
    ///
    /// JSON over HTTP/1.1 or cleartext HTTP/2: POST /v1/join, /v1/leave,
    /// /v1/failed, /v1/heartbeat; GET /v1/parent, /v1/trees. Every change is
    /// kept in --state before it is answered, so a restart loses no tree.
    /// Runs until interrupted.
    Treemgr(TreemgrArgs),
    /// Remove an image name (and its manifest unless another name uses it).
    ///
    /// Chunks stay in the store (other images may share them) until
    /// `tessera gc` reclaims what no image uses.
    Rm {
        /// Image names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Manage the keyring (the salt and the tenants' master keys).
    ///
    /// No command ever makes a keyring silently where images need one: a
    /// store whose keyring is missing says so and where it was expected.
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Reclaim the store's space: advance garbage collection one safe step.
    ///
    /// The store is split into generations. Imports write only into the
    /// active one. Each call does one step: rotate (a new active generation;
    /// the old one is retired), migrate (once --lease has passed and no
    /// import holds a lease on it, every name of a retired generation moves
    /// into the active one with its chunks — hard links locally, server-side
    /// copies on S3 — and the retired generation, now used by no name, is
    /// expired), or delete (an expired generation, whole, after --grace).
    /// What no image uses is never copied, and so goes with its generation.
    /// A read of an expired generation is a bug: it raises
    /// tessera_gc_expired_reads_total and an alarm, and the next call puts
    /// the generation back to retired. Safe to run from cron; `tessera gc
    /// --grace 0s --lease 0s --rotate-after 0s` run three times in a row on an
    /// idle store leaves only live images' chunks.
    Gc(GcArgs),
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// How long an expired generation is kept before it is deleted.
    #[arg(long, default_value = "24h", value_parser = parse_long_duration, value_name = "DURATION")]
    pub grace: std::time::Duration,
    /// How long after a rotation names move out of the retired generation:
    /// at least the longest import (imports hold leases of `import --lease`).
    #[arg(long, default_value = "1h", value_parser = parse_long_duration, value_name = "DURATION")]
    pub lease: std::time::Duration,
    /// Rotate only when the active generation is at least this old.
    #[arg(long, default_value = "7d", value_parser = parse_long_duration, value_name = "DURATION")]
    pub rotate_after: std::time::Duration,
    /// Print one JSON object: active, retired, expired, deleted,
    /// deleted_chunks, deleted_bytes, live_images (and what the step did).
    #[arg(long)]
    pub json: bool,
}

/// Parses `90s`, `15m`, `24h`, `7d`, `0`.
pub fn parse_long_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let unit_secs = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use s, m, h, d)")),
    };
    let secs = n * unit_secs;
    if !(0.0..=10.0 * 365.0 * 86_400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Subcommand, Debug)]
pub enum KeyringCommand {
    /// Make a new keyring (a fresh salt, no tenants) where none is.
    ///
    /// An existing keyring is never replaced. A store that already holds
    /// images needs the keyring that sealed them: a new one does not open
    /// them, so restore that one from a backup if it was lost. With
    /// --keyring kms://KEY the salt is made by the key service and kept,
    /// wrapped, in the store.
    Init {
        /// Which images may share chunks by default: all (global) or only
        /// one tenant's (tenant). `import --dedup-scope` overrides it.
        #[arg(long, default_value = "global", value_name = "global|tenant")]
        dedup_scope: tessera_chunk::DedupScope,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Listen for NBD clients at unix:PATH or HOST:PORT (repeatable;
    /// default unix:$TESSERA_HOME/nbd.sock).
    #[arg(long = "nbd", value_name = "ADDR")]
    pub nbd: Vec<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Once listening, write the addresses bound (port 0 picks a free one)
    /// to FILE as JSON: {"nbd": [...], "metrics": ..., "peer": ...}.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Fetch an image's start-up profile (recorded by `tessera run`) into
    /// the caches when a client first opens the image.
    #[arg(long)]
    pub prefetch: bool,
    /// TLS for the TCP listeners (NBD_OPT_STARTTLS, as qemu-nbd and nbdkit
    /// do): the server's certificate chain (PEM). A TLS listener answers
    /// any other option before STARTTLS with NBD_REP_ERR_TLS_REQD.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Which client certificate subject may open which exports (JSON; see
    /// docs/DESIGN-NOTES.md); needs --tls-client-ca. Without it every
    /// client may open every export.
    #[arg(long, value_name = "FILE", requires = "tls_client_ca")]
    pub exports_policy: Option<PathBuf>,
    /// UNSAFE: serve NBD in clear on addresses other than loopback: anyone
    /// who can reach them reads every image and writes to every label.
    #[arg(long)]
    pub allow_plaintext_nbd: bool,
    /// The control socket `tessera run` attaches VM disks through (default
    /// $TESSERA_HOME/agent.sock; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve VM disks as vhost-user-blk devices, one socket per attached
    /// disk in DIR (default $TESSERA_HOME/vhost-user): NAME read-only,
    /// NAME@LABEL copy-on-write. QEMU: -object
    /// memory-backend-memfd,id=mem,size=512M,share=on -M q35,memory-backend=mem
    /// -chardev socket,id=d,path=SOCK,reconnect=1 -device vhost-user-blk-pci,chardev=d.
    #[arg(long, value_name = "DIR")]
    pub vhost_user: Option<PathBuf>,
    /// Take over from the agent running on the control socket: it hands its
    /// listeners and its VMs' disks over, finishes the requests it has,
    /// and stops; the VMs reconnect here without noticing.
    #[arg(long)]
    pub takeover: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// What NBD clients may make the agent hold, server-wide.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// NBD connections served at once; more are closed as they arrive.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// Bytes of request and reply buffers all NBD connections hold at once;
    /// requests past it wait (the client sees back-pressure).
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub buffer_memory: u64,
    /// Disconnect an NBD client that takes longer than this to finish its
    /// handshake or to take a reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub client_timeout: std::time::Duration,
    /// NAME@LABEL overlays open at once (each closes when its last
    /// connection ends).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_overlays: usize,
}

impl Default for LimitArgs {
    fn default() -> LimitArgs {
        let l = tessera_agent::nbd::Limits::default();
        LimitArgs { max_connections: l.max_connections, buffer_memory: l.buffer_bytes, client_timeout: l.client_timeout, max_overlays: 1024 }
    }
}

/// Where chunks are cached and how hard the origin may be pushed.
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// Directory for the disk cache and the overlays (default $TESSERA_HOME/cache).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Memory cache size (plaintext chunks).
    #[arg(long, default_value = "512MiB", value_parser = parse_size, value_name = "SIZE")]
    pub cache_mem: u64,
    /// Disk cache size (sealed chunks).
    #[arg(long, default_value = "10GiB", value_parser = parse_size, value_name = "SIZE")]
    pub cache_disk: u64,
    /// Requests to the origin store allowed at once.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub origin_concurrency: usize,
    /// Origin requests allowed to wait for a slot; beyond that they fail at once.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub origin_queue: usize,
    /// Latency to add to each origin request, e.g. 30ms (benchmarks: a remote origin).
    #[arg(long, default_value = "0ms", value_parser = parse_duration, value_name = "DURATION")]
    pub origin_latency: std::time::Duration,
    /// Bandwidth of the link to the origin, bytes per second, e.g. 100MiB (benchmarks).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub origin_bandwidth: Option<u64>,
    #[command(flatten)]
    pub tier: TierArgs,
    #[command(flatten)]
    pub tree: TreeArgs,
}

/// Function trees (FaaSNet): chunks from a parent agent before the cache
/// tier and the origin.
#[derive(Args, Debug, Clone, Default)]
pub struct TreeArgs {
    /// The function-tree manager (`tessera treemgr`): this agent joins the
    /// tree of each function it reads (the image name, or `run --function`),
    /// asks its parent there for chunks before the cache tier and the
    /// origin, and serves its own children on --peer-listen.
    #[arg(long, value_name = "HOST:PORT", requires = "peer_listen")]
    pub tree_manager: Option<String>,
    /// Where to serve chunks to children in function trees (port 0: one
    /// the system picks). Off this host it needs --tree-token-file and
    /// --peer-tls-cert/--peer-tls-key.
    #[arg(long, value_name = "HOST:PORT", requires = "tree_manager")]
    pub peer_listen: Option<String>,
    /// The address children reach this agent at, its name in the trees
    /// (default: the address --peer-listen bound).
    #[arg(long, value_name = "HOST:PORT", requires = "tree_manager")]
    pub advertise: Option<String>,
    /// File holding the bearer token of the tree manager and of every
    /// agent's peer server.
    #[arg(long, value_name = "FILE", requires = "tree_manager")]
    pub tree_token_file: Option<PathBuf>,
    /// Talk TLS to the tree manager and to parents, trusting this CA (PEM);
    /// required with a token unless they are on this host.
    #[arg(long, value_name = "FILE", requires = "tree_manager")]
    pub tree_tls_ca: Option<PathBuf>,
    /// Serve children over TLS with this certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["peer_tls_key", "tree_manager"])]
    pub peer_tls_cert: Option<PathBuf>,
    /// The key of --peer-tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,
}

/// How to reach the shared cache tier.
#[derive(Args, Debug, Clone)]
pub struct TierArgs {
    /// Shared cache nodes (`tessera cachenode`), comma-separated: chunks
    /// missing locally are rebuilt from the first K of their K+M stripes
    /// there before the origin is asked, and chunks fetched from the origin
    /// are stored there in the background.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    pub cache_nodes: Vec<String>,
    /// Erasure code of the cache tier: K data + M parity stripes per chunk
    /// (any K rebuild it; 1+2 is plain replication on 3 nodes).
    #[arg(long, default_value = "4+1", value_name = "K+M")]
    pub ec: String,
    /// File holding the bearer token the cache nodes expect.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Talk TLS to the cache nodes (HTTP/2, ALPN h2), trusting this CA
    /// (PEM); required with a token unless every node is on this host.
    #[arg(long, value_name = "FILE")]
    pub cache_tls_ca: Option<PathBuf>,
}

/// Parses `30ms`, `1.5s`, `250us`, `0`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return Err(format!("invalid duration unit in {s:?} (use s, ms, us)")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Args, Debug)]
pub struct CachenodeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Directory for the stripes kept on disk.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Bytes of stripes kept in memory.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub mem: u64,
    /// Bytes of stripes kept on disk.
    #[arg(long, default_value = "10GiB", value_parser = parse_size, value_name = "SIZE")]
    pub disk: u64,
}

/// Where and how a server beside the agents (a cache node, the tree
/// manager) listens.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address to serve on.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// File holding the bearer token every request must carry (required
    /// unless the server listens on a loopback address).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve over TLS with this certificate chain (PEM); required, with a
    /// token, unless the server listens on a loopback address.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Once listening, write the addresses bound (port 0 picks a free one)
    /// to FILE as JSON: {"listen": ..., "metrics": ...}.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The systems to simulate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "faasnet", value_name = "faasnet|tessera|baseline|kraken|on-demand")]
    pub system: Vec<tessera_sim::System>,
    /// VMs in the fleet.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub vms: usize,
    /// Containers started at once (spread over the VMs).
    #[arg(long, default_value_t = 2500, value_name = "N")]
    pub invocations: usize,
    /// Image size as the registry holds it (compressed layers), MB.
    #[arg(long, default_value_t = 428.0, value_name = "N")]
    pub image_mb: f64,
    /// Fraction of the image a container's start reads.
    #[arg(long, default_value_t = 0.161, value_name = "F")]
    pub fetch_fraction: f64,
    /// Each VM's NIC, Gbit/s each way.
    #[arg(long, default_value_t = 1.0, value_name = "G")]
    pub nic_gbps: f64,
    /// The registry's (origin's) aggregate bandwidth, Gbit/s.
    #[arg(long, default_value_t = 10.0, value_name = "G")]
    pub registry_gbps: f64,
    /// Latency of one registry request, e.g. 29ms.
    #[arg(long, default_value = "29ms", value_parser = parse_duration, value_name = "DURATION")]
    pub registry_latency: std::time::Duration,
    /// CPU time of one container's start once its data is on the VM.
    #[arg(long, default_value = "495ms", value_parser = parse_duration, value_name = "DURATION")]
    pub start_cpu: std::time::Duration,
    /// Tessera: origin requests per second allowed across the fleet.
    #[arg(long, default_value_t = 5500.0, value_name = "N")]
    pub origin_rps: f64,
    /// Tessera: chunk requests a root has in flight to the origin.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub origin_concurrency: usize,
    /// Tessera: its compressed chunks' size over the registry's layers.
    #[arg(long, default_value_t = 0.93, value_name = "F")]
    pub compression: f64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Print one JSON object per system, a line each.
    #[arg(long)]
    pub json: bool,
    /// Draw containers running over time for the systems to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TreemgrArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// An agent that sends nothing (join, heartbeat, parent query) for this
    /// long leaves every tree; 0 keeps agents until they leave.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: std::time::Duration,
    /// Where the trees are kept across restarts (written before each change
    /// is answered).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image name, or NAME@LABEL for a writable view.
    pub name: String,
    /// Empty directory to mount the FUSE filesystem on.
    pub dir: PathBuf,
    /// Also loop-mount the disk's ext4 filesystem here.
    #[arg(long = "loop", value_name = "MOUNTPOINT")]
    pub loop_mount: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Image name.
    pub name: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// kvm, tcg, or auto (kvm when a time-limited probe boots with it).
    #[arg(long, default_value = "auto", value_parser = ["kvm", "tcg", "auto"])]
    pub accel: String,
    /// Extra environment, KEY=VALUE (repeatable; overrides the image's).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Print a cold-start report on stderr.
    #[arg(long)]
    pub report: bool,
    /// Print the cold-start report as one JSON object on stdout after the run.
    #[arg(long)]
    pub json: bool,
    /// Send the VM's console (kernel messages) to stderr instead of a log file.
    #[arg(long)]
    pub verbose: bool,
    /// Neither use nor record a start-up profile.
    #[arg(long)]
    pub no_profile: bool,
    /// Boot from the image itself, read-only (the disk advertises it), with
    /// a fresh tmpfs on /tmp: no overlay is made. An agent serves an image
    /// read-only to one VM at a time.
    #[arg(long)]
    pub read_only: bool,
    /// The guest kernel: built (the one scripts/guest-kernel.sh builds into
    /// the kernel cache, booted directly on QEMU's microvm machine), debian
    /// (Debian's cloud kernel, on q35), or auto (built if the cache holds
    /// it, else debian).
    #[arg(long, default_value = "auto", value_parser = ["auto", "built", "debian"])]
    pub kernel: String,
    /// How the VM reaches its disk: vhost-user (vhost-user-blk: the agent
    /// reads and writes guest memory directly) or nbd.
    #[arg(long, default_value = "vhost-user", value_parser = ["vhost-user", "nbd"])]
    pub disk: String,
    /// The control socket of the agent to use (default: the host's agent at
    /// $TESSERA_HOME/agent.sock when one runs, else a private one for this
    /// run, in-process).
    #[arg(long, value_name = "PATH", conflicts_with = "tree_manager")]
    pub agent: Option<PathBuf>,
    /// The function this run is an instance of: its function tree (with
    /// --tree-manager; default: the image name).
    #[arg(long, value_name = "NAME", requires = "tree_manager")]
    pub function: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The command's arguments, in place of the image's cmd.
    #[arg(last = true, value_name = "CMD ARGS")]
    pub args: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Latency of chunk reads from the shared cache tier (first K of N
    /// stripes, or waiting for the K data stripes as a naive client does),
    /// and from the origin through a throttle. Prints JSON.
    Tier {
        /// Image whose chunks are read (at random).
        name: String,
        #[command(flatten)]
        tier: TierArgs,
        /// Chunk reads to time per policy.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Chunk reads to time from the origin.
        #[arg(long, default_value_t = 100)]
        origin_reads: usize,
        /// Store the image's chunks in the tier first.
        #[arg(long)]
        warm: bool,
        /// Which stripes a read waits for: first-k, data-stripes, or both
        /// (alternating read by read).
        #[arg(long, default_value = "first-k", value_parser = ["first-k", "data-stripes", "both"])]
        policy: String,
        /// Another list of the same nodes (e.g. one reached through a
        /// delaying relay), read first-k in turn with the others, so both
        /// are timed in the same moments; reported as "versus".
        #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
        versus: Vec<String>,
        /// Latency of the origin throttle.
        #[arg(long, default_value = "30ms", value_parser = parse_duration, value_name = "DURATION")]
        origin_latency: std::time::Duration,
        /// Bandwidth of the origin throttle, bytes per second.
        #[arg(long, default_value = "100MiB", value_parser = parse_size, value_name = "SIZE")]
        origin_bandwidth: Option<u64>,
    },
    /// A TCP relay that passes what the server sends back DELAY late, as
    /// `tc qdisc ... netem delay` on the server's link would (for kernels
    /// without sch_netem). Runs until interrupted.
    Relay {
        /// Address to accept clients on.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// The server to relay to.
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// How late the server's bytes reach the client, e.g. 50ms.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        delay: std::time::Duration,
        /// Once listening, write {"listen": ADDR} to FILE.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Seal every non-zero 512 KiB chunk of FILE on all cores, with no store:
    /// the baseline import throughput is compared with. Prints JSON.
    Seal {
        /// A raw disk image, e.g. from `tessera export`.
        file: PathBuf,
        /// Threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Hit rates of LRU-2 and plain LRU at equal capacity on a generated
    /// trace: hot functions read again and again, cron jobs reading chunks
    /// once in between. Prints JSON.
    Lru {
        /// Cache capacity in chunks.
        #[arg(long, default_value_t = 300)]
        capacity: u64,
        /// Hot functions (40 chunks each).
        #[arg(long, default_value_t = 10)]
        hot_functions: u32,
        /// One-shot chunks read between two hot invocations.
        #[arg(long, default_value_t = 60)]
        cron_chunks: u32,
    },
    /// RSS of an NBD server while CLIENTS connections each send 64 reads of
    /// 32 MiB and never read a reply, and the latency a well-behaved client
    /// sees meanwhile. Prints JSON.
    NbdFlood {
        /// The server's unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// Export name.
        #[arg(long)]
        export: String,
        /// Flooding clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// How long to hold the flood.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        seconds: std::time::Duration,
        /// The server's process id (its RSS is sampled).
        #[arg(long)]
        pid: u32,
    },
    /// Descriptors and RSS of an NBD server before and after CONNECTIONS
    /// short connections, each to a label of its own. Prints JSON.
    NbdLabels {
        /// The server's unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// Export name (labels are EXPORT@labelN).
        #[arg(long)]
        export: String,
        /// Connections to make.
        #[arg(long, default_value_t = 10000)]
        connections: usize,
        /// The server's process id.
        #[arg(long)]
        pid: u32,
    },
    /// Latency of random reads from an NBD export, one at a time, through
    /// the same minimal client whatever the server. Prints JSON.
    NbdLatency {
        /// The server's unix socket.
        #[arg(long, conflicts_with = "tcp")]
        socket: Option<PathBuf>,
        /// The server's TCP address, HOST:PORT.
        #[arg(long)]
        tcp: Option<String>,
        /// Upgrade to TLS (NBD_OPT_STARTTLS), trusting this CA.
        #[arg(long, requires = "tcp")]
        tls_ca: Option<PathBuf>,
        /// The client certificate to present.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Its key.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The name the server's certificate must carry.
        #[arg(long, default_value = "localhost")]
        tls_hostname: String,
        /// Export name.
        #[arg(long)]
        export: String,
        /// Bytes per read (aligned to this size).
        #[arg(long, default_value = "4096", value_parser = parse_size)]
        block: u64,
        /// Reads to time.
        #[arg(long, default_value_t = 20000)]
        count: usize,
        /// Only read within the first SIZE bytes (e.g. the warm part).
        #[arg(long, value_parser = parse_size)]
        span: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The image to import.
    pub source: String,
    /// Name to import as (default: repository or directory name and tag).
    #[arg(long)]
    pub name: Option<String>,
    /// Tenant whose master key seals the manifest.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH")]
    pub platform: String,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub insecure: bool,
    /// Registry credentials (otherwise from ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    /// Free space to leave in the filesystem for a writable root (holes: costs nothing stored).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub headroom: u64,
    /// Sealing threads (default: one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Which images may share this one's chunks: all (global) or only its
    /// tenant's (tenant). Default: the keyring's (`keyring init --dedup-scope`).
    #[arg(long, value_name = "global|tenant")]
    pub dedup_scope: Option<tessera_chunk::DedupScope>,
    /// Give up (naming nothing) if the import takes longer than this; `gc
    /// --lease` must be at least as long.
    #[arg(long, default_value = "1h", value_parser = parse_long_duration, value_name = "DURATION")]
    pub lease: std::time::Duration,
    /// Place together, as `tessera optimize` does, the files that image
    /// NAME's recorded start read (a new version starts optimized with its
    /// previous version's profile).
    #[arg(long, value_name = "NAME")]
    pub optimize_with: Option<String>,
    /// Print one JSON object with the result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct OptimizeArgs {
    /// The image (it needs a start-up profile: run it once).
    pub name: String,
    /// Name the optimized image NEW (default: NAME, which then points at it).
    #[arg(long = "as", value_name = "NEW")]
    pub as_name: Option<String>,
    /// Talk plain HTTP to the source's registry.
    #[arg(long)]
    pub insecure: bool,
    /// Credentials for the source's registry (otherwise from ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    /// Print one JSON object: name, manifest, start_chunks_before,
    /// start_chunks_after, start_bytes_before, start_bytes_after, new_chunks.
    #[arg(long)]
    pub json: bool,
}

/// Parses sizes such as `512MiB`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M, G, T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30ms").unwrap(), std::time::Duration::from_millis(30));
        assert_eq!(parse_duration("1.5s").unwrap(), std::time::Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), std::time::Duration::ZERO);
        assert!(parse_duration("5m").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
