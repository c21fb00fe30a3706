#!/usr/bin/env bash
# Installs everything incfs needs on a fresh Debian machine of this kind, idempotently.
# Re-running it when everything is present takes a few seconds.
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (it installs apt packages); try: sudo $0"
  exit 1
fi

# Debian packages: fuse3 (fusermount3), llvm-22 (bpf-linker), clang-22 (the default workload),
# nginx-light (tests serve images through a real static server), pkg-config, docker-registry
# (distribution 2.8: the OCI registry tests) with apache2-utils (htpasswd -B for its basic auth),
# python3-venv: the S3 tests' server (below).
APT_PACKAGES=(fuse3 libfuse3-dev llvm-22-dev libpolly-22-dev clang-22 pkg-config nginx-light openssl procps docker-registry apache2-utils python3 python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "apt packages present: ${APT_PACKAGES[*]}"
fi

# The probe crate is built with the nightly toolchain (build-std needs rust-src).
if ! rustup toolchain list | grep -q '^nightly'; then
  log "no nightly toolchain: the eBPF probe cannot be built (rustup toolchain install nightly)"
  exit 1
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
else
  log "nightly rust-src present"
fi

# bpf-linker links the probe; built against the system LLVM 22.
BPF_LINKER_VERSION=0.13.0
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against llvm-22 (a few minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 PATH="/usr/lib/llvm-22/bin:$PATH" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features llvm-22
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

# moto's S3-compatible server for the s3:// tests (cli/tests/s3_source.rs), from PyPI: the
# mock S3 that botocore's and boto3's own users test against, SigV4-checking once its IAM
# auth is on. Kept in its own venv (never the system Python), `moto_server` on PATH.
MOTO_VERSION=5.2.1
MOTO_VENV=/opt/incfs-moto
moto_ok() {
  local bin py
  bin=$(command -v moto_server 2>/dev/null) || return 1
  py="$(dirname "$(readlink -f "$bin")")/python3"
  "$py" -c "import moto, boto3, flask, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null
}
if ! moto_ok; then
  log "installing moto[server] $MOTO_VERSION in $MOTO_VENV"
  /usr/bin/python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION"
  ln -sf "$MOTO_VENV/bin/moto_server" /usr/local/bin/moto_server
  moto_ok || { log "moto_server $MOTO_VERSION did not install"; exit 1; }
else
  log "moto_server $MOTO_VERSION present"
fi

# FUSE needs the device node; tracefs is mounted by the recorder itself when missing.
if [ ! -e /dev/fuse ]; then
  log "warning: /dev/fuse is missing: mount tests will fail (modprobe fuse)"
fi
log "done"
