//! A discrete-event simulator of container start-up across a fleet: how
//! long `invocations` containers of one function take to be running on
//! `vms` VMs when their image comes from a registry by a full pull, by
//! on-demand block fetches, by P2P (Kraken), through FaaSNet's function
//! trees, or through Tessera's (function trees, compressed chunks,
//! prefetched start-up profiles, a bounded origin).
//!
//! **The model.** Everything moves in blocks (512 KiB, Kraken in pieces).
//! Every VM has a NIC with a bandwidth each way; the registry (the origin)
//! has an aggregate bandwidth and a latency per request. A transfer holds
//! the sender's uplink and the receiver's downlink for `bytes / bandwidth`
//! each, first come first served (one queue per link, a reservation per
//! block), and arrives after both and the latency. A VM's containers start
//! once the blocks their start needs are on the VM (a full pull: the whole
//! image, extracted); each start then takes CPU time on one of the VM's
//! cores, so a third container on a two-core VM waits. Function trees come
//! from [`tessera_tree::FunctionTree`], the code the tree manager runs: VMs
//! join in order, and each block a VM receives is forwarded to its children
//! as soon as it has arrived.
//!
//! Every parameter is in [`Params`] with its source in `docs/SIMULATOR.md`;
//! none is fitted to a result.
#![deny(missing_docs)]

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::Serialize;
use tessera_tree::FunctionTree;

/// How images reach the VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum System {
    /// Each VM pulls the whole image from the registry (`docker pull`),
    /// extracts it, and starts.
    Baseline,
    /// Each VM fetches the blocks its start reads from the registry, one
    /// demand fault at a time.
    OnDemand,
    /// Each VM downloads the whole image in pieces from an origin node and
    /// from the peers that have them (Uber's Kraken), extracts it, and starts.
    Kraken,
    /// One function tree: the root fetches on demand from the registry,
    /// every VM forwards each block to its children as it arrives.
    Faasnet,
    /// Function trees with Tessera's data path: compressed chunks, the
    /// start-up profile prefetched (many requests in flight) and the origin
    /// bound.
    Tessera,
}

impl System {
    /// Every system, in the order the plot draws them.
    pub const ALL: [System; 5] = [System::Baseline, System::Kraken, System::OnDemand, System::Faasnet, System::Tessera];

    /// The name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            System::Baseline => "baseline",
            System::OnDemand => "on-demand",
            System::Kraken => "kraken",
            System::Faasnet => "faasnet",
            System::Tessera => "tessera",
        }
    }
}

impl std::str::FromStr for System {
    type Err = String;
    fn from_str(s: &str) -> Result<System, String> {
        System::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| format!("{s:?} is not a system: use faasnet, tessera, baseline, kraken or on-demand"))
    }
}

/// The simulated fleet, image and systems. The defaults and their sources
/// are in `docs/SIMULATOR.md`.
#[derive(Clone, Debug)]
pub struct Params {
    /// VMs available (each runs `invocations / vms` containers, give or take one).
    pub vms: usize,
    /// Containers started at once, at time 0.
    pub invocations: usize,
    /// Size of the image as the registry holds it (compressed layers; FaaSNet's
    /// and Tessera's compressed blocks take about as much), MB (10^6 bytes).
    pub image_mb: f64,
    /// Fraction of the image a container's start reads.
    pub fetch_fraction: f64,
    /// Bandwidth of each VM's NIC, each way, Gbit/s.
    pub nic_gbps: f64,
    /// Aggregate bandwidth of the registry (the origin), Gbit/s.
    pub registry_gbps: f64,
    /// Latency of one request to the registry, seconds.
    pub registry_latency: f64,
    /// Latency of one transfer between two VMs, seconds.
    pub peer_latency: f64,
    /// Block size, bytes.
    pub block_bytes: u64,
    /// Cores per VM.
    pub cores: usize,
    /// CPU time of one container's start once its data is there, seconds.
    pub start_seconds: f64,
    /// Demand faults a lazily loading container has in flight.
    pub demand_in_flight: usize,
    /// Layer downloads `docker pull` runs at once.
    pub pull_in_flight: usize,
    /// Extraction (gunzip + untar) rate of a pulled image, MB/s of compressed layers.
    pub extract_mbps: f64,
    /// Kraken: piece size, bytes.
    pub kraken_piece_bytes: u64,
    /// Kraken: piece requests in flight to one peer (to an origin: `kraken_origin_in_flight`).
    pub kraken_in_flight: usize,
    /// Kraken: piece requests in flight to one origin.
    pub kraken_origin_in_flight: usize,
    /// Kraken: peers an agent is connected to.
    pub kraken_peers: usize,
    /// Kraken: origin nodes (each a VM like the others).
    pub kraken_origins: usize,
    /// Tessera: its sealed (compressed) chunks' size over the registry's layers.
    pub tessera_compression: f64,
    /// Tessera: chunk requests the root has in flight to the origin (its bound).
    pub tessera_in_flight: usize,
    /// Tessera: origin requests per second allowed across the fleet.
    pub tessera_origin_rps: f64,
    /// Seed of the random choices (Kraken's peers and pieces).
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            vms: 1000,
            invocations: 2500,
            image_mb: 428.0,
            fetch_fraction: 0.161,
            nic_gbps: 1.0,
            registry_gbps: 10.0,
            registry_latency: 0.029,
            peer_latency: 0.0005,
            block_bytes: 512 << 10,
            cores: 2,
            start_seconds: 0.495,
            demand_in_flight: 1,
            pull_in_flight: 3,
            extract_mbps: 47.6,
            kraken_piece_bytes: 4 << 20,
            kraken_in_flight: 3,
            kraken_origin_in_flight: 5,
            kraken_peers: 10,
            kraken_origins: 1,
            tessera_compression: 0.93,
            tessera_in_flight: 16,
            tessera_origin_rps: 5500.0,
            seed: 1,
        }
    }
}

/// What a simulation found (the JSON of `tessera sim`).
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The system.
    pub system: &'static str,
    /// VMs used.
    pub vms: usize,
    /// Containers started.
    pub invocations: usize,
    /// When the first container was running, seconds.
    pub seconds_first_running: f64,
    /// When the last container was running, seconds.
    pub seconds_all_running: f64,
    /// Bytes read from the registry (the origin).
    pub origin_bytes: u64,
    /// Bytes sent between VMs.
    pub peer_bytes: u64,
    /// The registry's busiest second, Gbit/s.
    pub max_origin_gbps: f64,
    /// The registry's busiest second, requests.
    pub max_origin_requests_per_second: u64,
    /// Median time to running, seconds.
    pub p50_seconds: f64,
    /// 99th percentile of the time to running, seconds.
    pub p99_seconds: f64,
    /// When each container was running, in order (for the plot).
    #[serde(skip)]
    pub running: Vec<f64>,
}

/// Time-ordered events (earliest first; ties in the order they were made).
#[derive(Debug)]
struct Event {
    at: f64,
    seq: u64,
    what: What,
}

#[derive(Debug, Clone, Copy)]
enum What {
    /// Block `block` is on VM `vm`, from VM `from` ([`REGISTRY`]: the registry or the parent).
    Arrive { vm: usize, block: usize, from: usize },
    /// VM `vm` has room for another request (a demand fetch or a pull).
    Request { vm: usize },
    /// A container on VM `vm` may take a core for its start.
    Start { vm: usize },
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reversed.
        other.at.total_cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

/// A link (one direction of a NIC, or the registry): free again at `free`.
#[derive(Clone, Copy, Default)]
struct Link {
    free: f64,
}

impl Link {
    /// Holds the link for `seconds` from `at` on (or once it is free).
    fn hold(&mut self, at: f64, seconds: f64) -> f64 {
        let start = self.free.max(at);
        self.free = start + seconds;
        self.free
    }
}

/// One VM.
#[derive(Clone)]
struct Vm {
    down: Link,
    up: Link,
    /// Blocks (or pieces) on the VM or on their way.
    have: Vec<bool>,
    coming: Vec<bool>,
    /// Needed blocks present.
    got: usize,
    /// Next block of its own demand stream or pull, and requests in flight.
    next: usize,
    in_flight: usize,
    /// Containers to start here, and when each core is free.
    containers: usize,
    cores: Vec<f64>,
}

/// Per-second counters of the registry.
#[derive(Default)]
struct Meter {
    bytes: Vec<u64>,
    requests: Vec<u64>,
}

impl Meter {
    fn add(&mut self, at: f64, bytes: u64) {
        let s = at.max(0.0) as usize;
        if self.bytes.len() <= s {
            self.bytes.resize(s + 1, 0);
            self.requests.resize(s + 1, 0);
        }
        self.bytes[s] += bytes;
        self.requests[s] += 1;
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Sim<'a> {
    p: &'a Params,
    system: System,
    queue: BinaryHeap<Event>,
    seq: u64,
    vms: Vec<Vm>,
    registry: Link,
    meter: Meter,
    /// Blocks (pieces) of the image, and how many of them a start needs.
    blocks: usize,
    needed: usize,
    /// Bytes of one block as moved (compressed for Tessera).
    block_bytes: u64,
    tree: FunctionTree<usize>,
    /// Tessera: the next moment the origin admits a request.
    next_origin_slot: f64,
    origin_bytes: u64,
    peer_bytes: u64,
    running: Vec<f64>,
    /// Kraken: who holds each piece, and each agent's peers.
    holders: Vec<Vec<usize>>,
    peers: Vec<Vec<usize>>,
    /// Kraken: piece requests in flight from (agent, holder).
    pipes: std::collections::HashMap<(usize, usize), usize>,
    rng: Rng,
}

/// The sender of a block that came from the registry or a parent.
const REGISTRY: usize = usize::MAX;

/// Runs one simulation.
pub fn simulate(p: &Params, system: System) -> Outcome {
    let used = p.vms.min(p.invocations).max(1);
    let image = (p.image_mb * 1e6) as u64;
    let (unit, needs_all) = match system {
        System::Kraken => (p.kraken_piece_bytes, true),
        System::Baseline => (p.block_bytes, true),
        _ => (p.block_bytes, false),
    };
    let blocks = image.div_ceil(unit).max(1) as usize;
    let needed = if needs_all { blocks } else { ((blocks as f64 * p.fetch_fraction).ceil() as usize).clamp(1, blocks) };
    let block_bytes = match system {
        System::Tessera => ((unit as f64) * p.tessera_compression) as u64,
        _ => unit,
    };
    let cores = p.cores.max(1);
    let vms: Vec<Vm> = (0..used)
        .map(|i| Vm {
            down: Link::default(),
            up: Link::default(),
            have: vec![false; blocks],
            coming: vec![false; blocks],
            got: 0,
            next: 0,
            in_flight: 0,
            containers: p.invocations / used + usize::from(i < p.invocations % used),
            cores: vec![0.0; cores],
        })
        .collect();
    let mut tree = FunctionTree::new();
    if matches!(system, System::Faasnet | System::Tessera) {
        for i in 0..used {
            tree.insert(i);
        }
    }
    let mut sim = Sim {
        p,
        system,
        queue: BinaryHeap::new(),
        seq: 0,
        vms,
        registry: Link::default(),
        meter: Meter::default(),
        blocks,
        needed,
        block_bytes,
        tree,
        next_origin_slot: 0.0,
        origin_bytes: 0,
        peer_bytes: 0,
        running: Vec::with_capacity(p.invocations),
        holders: vec![Vec::new(); blocks],
        peers: Vec::new(),
        pipes: std::collections::HashMap::new(),
        rng: Rng(p.seed),
    };
    sim.begin();
    while let Some(e) = sim.queue.pop() {
        match e.what {
            What::Arrive { vm, block, from } => sim.arrive(e.at, vm, block, from),
            What::Request { vm } => sim.request(e.at, vm),
            What::Start { vm } => sim.start(e.at, vm),
        }
    }
    sim.outcome(used)
}

impl Sim<'_> {
    fn push(&mut self, at: f64, what: What) {
        self.seq += 1;
        self.queue.push(Event { at, seq: self.seq, what });
    }

    fn bits(&self, gbps: f64) -> f64 {
        gbps * 1e9 / 8.0
    }

    fn begin(&mut self) {
        match self.system {
            System::Baseline | System::OnDemand => {
                for vm in 0..self.vms.len() {
                    self.push(0.0, What::Request { vm });
                }
            }
            System::Faasnet | System::Tessera => {
                let root = self.tree.root().expect("at least one VM");
                self.push(0.0, What::Request { vm: root });
            }
            System::Kraken => {
                // Kraken's origins are VMs of their own, numbered after the agents.
                let agents = self.vms.len();
                for _ in 0..self.p.kraken_origins.max(1) {
                    let mut origin = self.vms[0].clone();
                    origin.have = vec![true; self.blocks];
                    origin.containers = 0;
                    self.vms.push(origin);
                }
                for b in 0..self.blocks {
                    self.holders[b] = (agents..self.vms.len()).collect();
                }
                // Each agent's peers: the tracker hands out random others.
                for i in 0..agents {
                    let mut mine = Vec::new();
                    let want = self.p.kraken_peers.min(agents - 1);
                    while mine.len() < want {
                        let j = self.rng.below(agents);
                        if j != i && !mine.contains(&j) {
                            mine.push(j);
                        }
                    }
                    self.peers.push(mine);
                }
                // Connections go both ways.
                for i in 0..agents {
                    for j in self.peers[i].clone() {
                        if !self.peers[j].contains(&i) {
                            self.peers[j].push(i);
                        }
                    }
                }
                for vm in 0..agents {
                    self.push(0.0, What::Request { vm });
                }
            }
        }
    }

    /// How many requests a VM's own stream keeps in flight.
    fn in_flight_limit(&self) -> usize {
        match self.system {
            System::Baseline => self.p.pull_in_flight,
            System::Tessera => self.p.tessera_in_flight,
            _ => self.p.demand_in_flight,
        }
        .max(1)
    }

    /// VM `vm` asks for the next blocks of its stream, up to its limit.
    fn request(&mut self, now: f64, vm: usize) {
        if self.system == System::Kraken {
            return self.kraken_request(now, vm);
        }
        let limit = self.in_flight_limit();
        let last = if matches!(self.system, System::Baseline) { self.blocks } else { self.needed };
        while self.vms[vm].in_flight < limit && self.vms[vm].next < last {
            let block = self.vms[vm].next;
            self.vms[vm].next += 1;
            if self.vms[vm].have[block] || self.vms[vm].coming[block] {
                continue;
            }
            let mut at = now;
            if self.system == System::Tessera {
                // The origin bound: requests are spaced to the allowed rate.
                at = at.max(self.next_origin_slot);
                self.next_origin_slot = at + 1.0 / self.p.tessera_origin_rps;
            }
            self.vms[vm].in_flight += 1;
            self.vms[vm].coming[block] = true;
            let arrive = self.fetch_from_registry(at, vm);
            self.push(arrive, What::Arrive { vm, block, from: REGISTRY });
        }
    }

    /// One block from the registry to `vm`, asked at `at`; when it arrives.
    fn fetch_from_registry(&mut self, at: f64, vm: usize) -> f64 {
        let bytes = self.block_bytes;
        let first_byte = at + self.p.registry_latency;
        let registry_done = self.registry.hold(first_byte, bytes as f64 / self.bits(self.p.registry_gbps));
        let nic = self.bits(self.p.nic_gbps);
        let vm_done = self.vms[vm].down.hold(first_byte, bytes as f64 / nic);
        // Counted in the second the registry sends it.
        self.meter.add(registry_done, bytes);
        self.origin_bytes += bytes;
        registry_done.max(vm_done)
    }

    /// One block from VM `from` to VM `to`, sent at `at`; when it arrives.
    fn between(&mut self, at: f64, from: usize, to: usize) -> f64 {
        let seconds = self.block_bytes as f64 / self.bits(self.p.nic_gbps);
        let start = at.max(self.vms[from].up.free).max(self.vms[to].down.free);
        self.vms[from].up.free = start + seconds;
        self.vms[to].down.free = start + seconds;
        self.peer_bytes += self.block_bytes;
        start + seconds + self.p.peer_latency
    }

    fn arrive(&mut self, now: f64, vm: usize, block: usize, from: usize) {
        if let Some(n) = self.pipes.get_mut(&(vm, from)) {
            *n -= 1;
        }
        let was_requested = self.vms[vm].coming[block] && !self.vms[vm].have[block];
        self.vms[vm].have[block] = true;
        if was_requested && self.vms[vm].in_flight > 0 && self.is_own_request(vm) {
            self.vms[vm].in_flight -= 1;
        }
        let counts = match self.system {
            System::Baseline | System::Kraken => true,
            _ => block < self.needed,
        };
        if counts {
            self.vms[vm].got += 1;
            if self.vms[vm].got == self.needed && self.vms[vm].containers > 0 {
                let ready = match self.system {
                    System::Baseline => self.extracted(now),
                    // Kraken hands a layer to docker only once the whole blob
                    // is there, and its pieces come rarest first, in no order:
                    // extraction starts when the download ends.
                    System::Kraken => now + self.p.image_mb / self.p.extract_mbps,
                    _ => now,
                };
                for _ in 0..self.vms[vm].containers {
                    self.push(ready, What::Start { vm });
                }
            }
        }
        match self.system {
            System::Faasnet | System::Tessera => {
                for child in self.tree.children(vm) {
                    if !self.vms[child].coming[block] {
                        self.vms[child].coming[block] = true;
                        let at = self.between(now, vm, child);
                        self.push(at, What::Arrive { vm: child, block, from: REGISTRY });
                    }
                }
                if self.tree.parent(vm).is_none() {
                    self.request(now, vm);
                }
            }
            System::Kraken => {
                self.holders[block].push(vm);
                // Kraken announces each new piece to the agent's peers.
                for peer in self.peers[vm].clone() {
                    self.kraken_request(now, peer);
                }
                self.kraken_request(now, vm);
            }
            _ => self.request(now, vm),
        }
    }

    /// Whether VM `vm` fetches for itself (not fed by a parent).
    fn is_own_request(&self, vm: usize) -> bool {
        match self.system {
            System::Faasnet | System::Tessera => self.tree.parent(vm).is_none(),
            _ => true,
        }
    }

    /// When a pulled image whose last byte came at `now` is extracted:
    /// extraction runs as layers arrive, at its own rate.
    fn extracted(&self, now: f64) -> f64 {
        let whole = self.p.image_mb / self.p.extract_mbps;
        // The last piece is extracted after it arrives; the rest overlapped
        // with the download unless extraction is the slower of the two.
        now.max(whole) + (self.block_bytes as f64 / 1e6) / self.p.extract_mbps
    }

    /// A container on `vm` takes the first free core for its start.
    fn start(&mut self, now: f64, vm: usize) {
        let cost = self.p.start_seconds;
        let cores = &mut self.vms[vm].cores;
        let (i, free) = cores.iter().copied().enumerate().min_by(|a, b| a.1.total_cmp(&b.1)).expect("at least one core");
        let done = free.max(now) + cost;
        cores[i] = done;
        self.running.push(done);
    }

    /// A Kraken agent asks for pieces it lacks, rarest first among what
    /// its peers and the origins hold, each from the holder with room in
    /// its pipeline whose uplink frees first.
    fn kraken_request(&mut self, now: f64, vm: usize) {
        let agents = self.vms.len() - self.p.kraken_origins.max(1);
        loop {
            let mut best: Option<(usize, usize, usize)> = None; // (holders, piece, from)
                                                                // A random start so agents do not all take the same rare piece.
            let offset = self.rng.below(self.blocks);
            for k in 0..self.blocks {
                let piece = (offset + k) % self.blocks;
                if self.vms[vm].have[piece] || self.vms[vm].coming[piece] {
                    continue;
                }
                let rarity = self.holders[piece].len();
                if best.is_some_and(|(r, _, _)| rarity >= r) {
                    continue;
                }
                let from = self.holders[piece]
                    .iter()
                    .copied()
                    .filter(|&h| {
                        (h >= agents || self.peers[vm].contains(&h))
                            && self.pipe(vm, h) < self.pipe_limit(h, agents)
                            // A request that would wait past Kraken's piece
                            // timeout is not made (it would time out).
                            && self.vms[h].up.free - now < self.kraken_timeout()
                    })
                    .min_by(|&a, &b| self.vms[a].up.free.total_cmp(&self.vms[b].up.free));
                if let Some(from) = from {
                    best = Some((rarity, piece, from));
                }
            }
            let Some((_, piece, from)) = best else {
                // Nothing to ask for now: try again when the first busy
                // holder frees (an arrival at a peer also wakes this one).
                if let Some(next) = self.kraken_retry(now, vm) {
                    self.push(next, What::Request { vm });
                }
                return;
            };
            *self.pipes.entry((vm, from)).or_insert(0) += 1;
            self.vms[vm].coming[piece] = true;
            let at = if from >= agents {
                // The origin is a VM too: its NIC is the limit.
                self.origin_bytes += self.block_bytes;
                let at = self.between(now + self.p.registry_latency, from, vm);
                self.meter.add(at, self.block_bytes);
                self.peer_bytes -= self.block_bytes;
                at
            } else {
                self.between(now, from, vm)
            };
            self.push(at, What::Arrive { vm, block: piece, from });
        }
    }

    /// Kraken's piece request timeout: 4 s per MB of piece, at least 4 s.
    fn kraken_timeout(&self) -> f64 {
        (4.0 * self.p.kraken_piece_bytes as f64 / (1 << 20) as f64).max(4.0)
    }

    /// When agent `vm`, with nothing it can ask for now, should look again:
    /// when the earliest holder it is waiting on frees enough (`None`: it
    /// has or awaits every piece).
    fn kraken_retry(&self, now: f64, vm: usize) -> Option<f64> {
        let agents = self.vms.len() - self.p.kraken_origins.max(1);
        let missing = (0..self.blocks).any(|b| !self.vms[vm].have[b] && !self.vms[vm].coming[b]);
        if !missing {
            return None;
        }
        let sources = self.peers[vm].iter().copied().chain(agents..self.vms.len());
        let wake = sources.map(|h| self.vms[h].up.free - self.kraken_timeout()).fold(f64::INFINITY, f64::min);
        // Else an arrival (here or at a peer) wakes it.
        (wake.is_finite() && wake > now).then_some(wake + 1e-6)
    }

    fn pipe(&self, vm: usize, from: usize) -> usize {
        self.pipes.get(&(vm, from)).copied().unwrap_or(0)
    }

    fn pipe_limit(&self, from: usize, agents: usize) -> usize {
        if from >= agents {
            self.p.kraken_origin_in_flight
        } else {
            self.p.kraken_in_flight
        }
    }

    fn outcome(mut self, used: usize) -> Outcome {
        self.running.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if self.running.is_empty() {
                return f64::NAN;
            }
            let i = ((self.running.len() as f64 * q).ceil() as usize).clamp(1, self.running.len()) - 1;
            self.running[i]
        };
        let max_bytes = self.meter.bytes.iter().copied().max().unwrap_or(0);
        Outcome {
            system: self.system.name(),
            vms: used,
            invocations: self.running.len(),
            seconds_first_running: self.running.first().copied().unwrap_or(f64::NAN),
            seconds_all_running: self.running.last().copied().unwrap_or(f64::NAN),
            origin_bytes: self.origin_bytes,
            peer_bytes: self.peer_bytes,
            max_origin_gbps: max_bytes as f64 * 8.0 / 1e9,
            max_origin_requests_per_second: self.meter.requests.iter().copied().max().unwrap_or(0),
            p50_seconds: pick(0.5),
            p99_seconds: pick(0.99),
            running: self.running.clone(),
        }
    }
}

pub mod plot;

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Params {
        Params { vms: 31, invocations: 62, image_mb: 64.0, ..Params::default() }
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let p = small();
        for s in System::ALL {
            let (a, b) = (simulate(&p, s), simulate(&p, s));
            assert_eq!(a.running, b.running, "{s:?}");
            assert_eq!(a.invocations, 62, "{s:?}: every container runs");
        }
    }

    #[test]
    fn a_tree_reads_each_block_from_the_origin_once() {
        let p = small();
        let needed = (64e6 / p.block_bytes as f64 * p.fetch_fraction).ceil() as u64;
        for s in [System::Faasnet, System::Tessera] {
            let o = simulate(&p, s);
            let block = if s == System::Tessera { (p.block_bytes as f64 * p.tessera_compression) as u64 } else { p.block_bytes };
            assert_eq!(o.origin_bytes, needed * block, "{s:?}");
            // Every VM but the root got every block from its parent.
            assert_eq!(o.peer_bytes, needed * block * 30, "{s:?}");
        }
        // Without a tree every VM goes to the registry.
        assert_eq!(simulate(&p, System::OnDemand).origin_bytes, needed * p.block_bytes * 31);
    }

    #[test]
    fn a_full_pull_is_bound_by_the_registry() {
        let p = Params { vms: 100, invocations: 100, image_mb: 100.0, registry_gbps: 1.0, ..Params::default() };
        let o = simulate(&p, System::Baseline);
        // 100 VMs x 100 MB through 1 Gbit/s is at least 80 s.
        assert!(o.seconds_all_running >= 80.0, "{}", o.seconds_all_running);
        // Each second's bytes are those of the blocks that ended in it: one block more at most.
        assert!(o.max_origin_gbps <= 1.0 + (p.block_bytes * 8) as f64 / 1e9, "{}", o.max_origin_gbps);
    }

    #[test]
    fn the_origin_bound_holds() {
        let p = Params { tessera_origin_rps: 50.0, ..small() };
        let o = simulate(&p, System::Tessera);
        assert!(o.max_origin_requests_per_second <= 50, "{o:?}");
    }

    #[test]
    fn a_third_container_on_two_cores_waits_for_one() {
        let p = Params { vms: 1, invocations: 3, ..small() };
        let o = simulate(&p, System::Faasnet);
        let gap = o.running[2] - o.running[0];
        assert!((gap - p.start_seconds).abs() < 1e-9, "{:?}", o.running);
    }
}
