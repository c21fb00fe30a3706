#!/usr/bin/env bash
# The main job on the bundled default workload (clang-22 compiling hello.c):
# build incfs, build the workload's tree, pack it into an image, inspect and verify it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${INCFS_DEMO_DIR:-out/demo}
mkdir -p "$out"
echo "[demo] building incfs (release)"
cargo build --release -q -p incfs-cli
incfs=target/release/incfs
echo "[demo] building the clang-22 tree in $out/clang-tree"
datasets/clang/build-tree.sh "$out/clang-tree"
echo "[demo] packing"
"$incfs" pack "$out/clang-tree" -o "$out/clang.img"
echo "[demo] inspecting"
"$incfs" inspect "$out/clang.img"
echo "[demo] verifying"
"$incfs" verify "$out/clang.img"
