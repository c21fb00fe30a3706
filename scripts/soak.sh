#!/usr/bin/env bash
# Long reliability runs, by hand (root, FUSE): scripts/soak.sh [crash|load|faults|all]
#   crash:  the kill -9 loop (incfs-fs/tests/crash_loop.rs), SOAK_CRASH_RUNS runs (default 5)
#           of SOAK_CRASH_ROUNDS kills each (default 100), each run with another seed.
#   load:   the load test (incfs-fs/tests/load.rs) over SOAK_LOAD_MIB (default 1024) MiB
#           for SOAK_LOAD_SECS (default 300) s with 64 readers.
#   faults: the fault workload (incfs-fs/tests/faults_workload.rs) with SOAK_FAULT_RUNS
#           (default 20) seeds.
# Uses the test profile CI builds. Prints each test's own summary lines; results go in
# docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}

run() { # TEST NAME, then env assignments
  local test=$1 name=$2
  shift 2
  env "$@" INCFS_REQUIRE_PRIVILEGED=1 cargo test -q -p incfs-fs --test "$test" -- \
    --exact "$name" --nocapture 2>&1 | grep -v '^$'
}

if [[ $what == crash || $what == all ]]; then
  for seed in $(seq 1 "${SOAK_CRASH_RUNS:-5}"); do
    echo "== crash loop, seed $seed"
    run crash_loop kill9_at_random_moments_while_prefetching_then_remount \
      INCFS_CRASH_ROUNDS="${SOAK_CRASH_ROUNDS:-100}" INCFS_CRASH_SEED="$((seed * 7919))"
  done
fi
if [[ $what == load || $what == all ]]; then
  echo "== load"
  run load many_readers_with_prefetch_get_right_bytes_in_bounded_memory \
    INCFS_LOAD_MIB="${SOAK_LOAD_MIB:-1024}" INCFS_LOAD_SECS="${SOAK_LOAD_SECS:-300}" \
    INCFS_LOAD_READERS=64
fi
if [[ $what == faults || $what == all ]]; then
  for seed in $(seq 1 "${SOAK_FAULT_RUNS:-20}"); do
    echo "== fault workload, seed $seed"
    run faults_workload a_real_program_over_a_faulty_server_is_right_or_gets_eio \
      INCFS_FAULT_SEED="$seed"
  done
fi
