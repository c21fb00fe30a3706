#!/usr/bin/env bash
# The peers benchmark, one command: builds incfs (release), installs the peers
# (datasets/peers/setup.sh), then runs incfs-bench for each workload and link and writes
# OUT/SUMMARY.md (every table), OUT/<workload>-<link>/{results.json,table.md,plot.svg}.
# Usage: datasets/peers/bench.sh [OUT]   (default out/peers; as root: it drops the page
# cache and mounts FUSE file systems). Environment:
#   RUNS=5                       measured rounds per configuration
#   WORKLOADS="clang python"     workloads (clang, python, synth)
#   LINKS="20:100 50:20"         latency_ms:bandwidth_mbit pairs
#   SLOW_SKIP=rclone-off         methods left out on links below 50 Mbit/s (rclone without
#                                cache re-reads ~1 GB for clang: ~7 min a run at 20 Mbit/s)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out/peers}
runs=${RUNS:-5}
workloads=${WORKLOADS:-clang python}
links=${LINKS:-20:100 50:20}
slow_skip=${SLOW_SKIP-rclone-off}
export INCFS_PEERS_ROOT=${INCFS_PEERS_ROOT:-/opt/incfs-peers}
./datasets/peers/setup.sh
cargo build --release -q -p incfs-cli -p incfs-datasets
bin=${CARGO_TARGET_DIR:-target}/release
all=local-cold,download-tar-zst,download-tree,rclone-full,rclone-off,nydus-lazy,nydus-prefetch,incfs-lazy,incfs-plan
mkdir -p "$out"
for link in $links; do
  lat=${link%%:*}; bw=${link##*:}
  methods=$all
  if [ "${bw%%.*}" -lt 50 ] && [ -n "$slow_skip" ]; then
    for m in ${slow_skip//,/ }; do methods=$(echo "$methods" | sed "s/\(^\|,\)$m\(,\|$\)/\1/; s/,,/,/; s/,$//"); done
  fi
  for w in $workloads; do
    dir="$out/$w-${lat}ms-${bw}mbit"
    echo "[peers] $w at $lat ms / $bw Mbit/s, $runs rounds: $methods"
    "$bin/incfs-bench" --out "$dir" --workload "$w" --latency-ms "$lat" --bandwidth-mbit "$bw" \
      --runs "$runs" --methods "$methods" --peers-bin "$INCFS_PEERS_ROOT/bin" > "$dir.log" 2>&1 \
      || { echo "[peers] failed, see $dir.log"; tail -5 "$dir.log"; continue; }
  done
done
{
  echo "# incfs and its peers: start times"
  echo
  for f in "$out"/*/table.md; do cat "$f"; echo; echo "Plot: \`${f%table.md}plot.svg\`"; echo; done
} > "$out/SUMMARY.md"
echo "[peers] tables in $out/SUMMARY.md"
