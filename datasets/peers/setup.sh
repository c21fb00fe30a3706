#!/usr/bin/env bash
# Installs the peers that incfs-bench compares incfs with (not needed by CI or the tests):
# - rclone (Debian package), for `rclone mount` over HTTP and `rclone copy`;
# - zstd (Debian package), for the tar.zst full download;
# - python3 with pip (Debian python3-pip when python3 has none), for the python workload;
# - Nydus 2.2.0 (nydusd + nydus-image) from crates.io: `cargo install nydus-rs --locked`,
#   into $INCFS_PEERS_ROOT (default /opt/incfs-peers; binaries in its bin/). It needs cmake
#   and the OpenSSL headers to build, ~5 min on 2 cores.
# Idempotent: what is there already is left alone. Run as root (apt-get).
set -euo pipefail
root=${INCFS_PEERS_ROOT:-/opt/incfs-peers}
need=()
command -v rclone >/dev/null || need+=(rclone)
command -v zstd >/dev/null || need+=(zstd)
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  echo "[peers] apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if [ ! -x "$root/bin/nydusd" ] || [ ! -x "$root/bin/nydus-image" ]; then
  echo "[peers] cargo install nydus-rs 2.2.0 into $root (takes ~5 min)"
  nice -n 10 cargo install nydus-rs --version 2.2.0 --locked --root "$root"
fi
echo "[peers] ready: rclone $(rclone version | head -1 | awk '{print $2}'), $root/bin/nydusd, $root/bin/nydus-image"
