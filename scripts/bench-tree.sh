#!/bin/sh
# Function trees (issue 14), docs/BENCHMARKS.md and docs/SIMULATOR.md:
#   1. the simulator on the paper's scenarios (2,500 containers on 1,000
#      VMs with the 428 MB image; 128 on 128 with the 758 MB one), every
#      system, with the plots in docs/;
#   2. the simulator against the real thing: seven agents, each in a
#      network namespace of its own, read a 96 MiB image at once through
#      one function tree (the `bench_seven_agents_against_the_simulator`
#      test, as root), three runs, each beside `tessera sim` on the same
#      parameters.
# Usage: scripts/bench-tree.sh (as root for part 2)
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet
tessera="$(pwd)/target/release/tessera"
all=faasnet,tessera,baseline,on-demand,kraken

echo "== 2,500 containers on 1,000 VMs, 428 MB (FaaSNet, Fig. 17)"
"$tessera" sim --system "$all" --vms 1000 --invocations 2500 --image-mb 428 --plot docs/sim-2500-on-1000.svg --json
echo "== 128 containers on 128 VMs, 758 MB (FaaSNet, Fig. 14)"
"$tessera" sim --system "$all" --vms 128 --invocations 128 --image-mb 758 --plot docs/sim-128-on-128.svg --json
echo "== one container alone, 428 MB (FaaSNet: 8.3 s is 1.6x this)"
"$tessera" sim --system faasnet,tessera --vms 1 --invocations 1 --image-mb 428 --json
echo "== Tessera's origin bound, cold cache tier: 2,500 on 1,000 with 100 requests/s allowed"
"$tessera" sim --system tessera --vms 1000 --invocations 2500 --image-mb 428 --origin-rps 100 --json

if [ "$(id -u)" != 0 ]; then
    echo "part 2 needs root (network namespaces)" >&2
    exit 0
fi
echo "== seven agents in namespaces vs the simulator (three runs)"
for i in 1 2 3; do
    cargo nextest run --release -p tessera-cli --test peers --run-ignored ignored-only --no-capture 2>/dev/null | grep '^{'
done
