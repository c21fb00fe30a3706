#!/usr/bin/env bash
# Runs one cargo-fuzz target: scripts/fuzz.sh TARGET SECONDS
#   TARGET: image | chunk | plan | trace (fuzz/fuzz_targets/), SECONDS: how long to run.
# Installs cargo-fuzz (nightly toolchain) when missing. Starts from the committed corpus in
# fuzz/corpus/TARGET, adds what it finds there, then minimizes it (libFuzzer -merge) so the
# committed corpus stays small; a crash is written to fuzz/artifacts/TARGET/ and fails the
# run. The corpus is replayed on stable by `cargo test -p incfs-planner --test fuzz_corpus`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if [ $# -ne 2 ]; then
  echo "usage: $0 TARGET SECONDS" >&2
  exit 2
fi
target=$1
seconds=$2

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo +nightly install cargo-fuzz --locked
fi

mkdir -p "corpus/$target"
# Rust is memory safe: no sanitizer (faster), panics and aborts are what we look for.
# Inputs above 1 MiB are not interesting and slow everything down; 2 GB of RSS is the limit.
features=()
if [ "$target" = trace ]; then features=(--features trace); fi
# FUZZ_KEEP_GOING=1: run in libFuzzer's fork mode, which goes on after a crash (each one
# still lands in fuzz/artifacts/TARGET/), to collect every finding of a run at once.
keep_going=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
  keep_going=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
fi
cargo +nightly fuzz run --sanitizer none "${features[@]}" "$target" "corpus/$target" -- \
  -max_total_time="$seconds" -max_len=1048576 -rss_limit_mb=2048 -timeout=30 \
  -print_final_stats=1 "${keep_going[@]}"
# Minimize: libFuzzer's merge of the corpus into an empty directory (what `cargo fuzz cmin`
# does, but through `run`, whose build is already up to date), keeping the inputs that cover
# new edges (not new hit counts: -use_counters=0), cut to 64 KiB. On 2026-11-25 that kept
# every edge and cut the corpora from 7.5 to 3.4 MB.
merged=$(mktemp -d "corpus/.$target.XXXXXX")
cargo +nightly fuzz run --sanitizer none "${features[@]}" "$target" "$merged" "corpus/$target" -- \
  -merge=1 -use_counters=0 -max_len=65536 -rss_limit_mb=2048 -timeout=30
rm -rf "corpus/$target"
mv "$merged" "corpus/$target"
echo "fuzz: $target ran ${seconds}s; corpus: $(find "corpus/$target" -type f | wc -l) files," \
  "$(du -sh --apparent-size "corpus/$target" | cut -f1)"
