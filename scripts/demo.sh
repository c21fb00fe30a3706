#!/usr/bin/env bash
# The main job on the bundled default workload, clang-22 compiling hello.c:
# build incfs, build the workload's tree, pack it, record two starts from the tree on local
# disk as a user does (`incfs record-trace --root TREE -- TREE/bin/clang -c hello.c`, the
# recorder's readahead-0 view; the mount's read-log when eBPF is unavailable), plan, relay
# the image hot-first, serve it over an emulated 20 ms / 100 Mbit/s link, and print one table:
# local cold start, full download (tar.zst) then run, lazy without plan, lazy with plan (both
# layouts). The comparison with rclone and Nydus is datasets/peers/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${INCFS_DEMO_DIR:-out/demo}
echo "[demo] building incfs (release)"
cargo build --release -q -p incfs-cli -p incfs-datasets
exec target/release/incfs-bench --out "$out" --runs "${INCFS_DEMO_RUNS:-1}" "$@"
