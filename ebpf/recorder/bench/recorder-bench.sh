#!/usr/bin/env bash
# Recorder benchmarks (root): wall-time overhead of recording `clang-22 -c hello.c`, cold and
# warm, and the event rate the recorder sustains. Prints one line per measurement; the
# figures and the machine go to BENCHMARKS.md ("## Recorder").
#
#   ebpf/recorder/bench/recorder-bench.sh [overhead|rate|all]
#
# Env: INCFS (default target/release/incfs), N (runs per case, default 10).
set -euo pipefail
INCFS=$(realpath "${INCFS:-target/release/incfs}")
N=${N:-10}
what=${1:-all}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
printf '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n' > hello.c

now_us() { echo $(( $(date +%s%N) / 1000 )); }

# Evict clang's tree (files under /usr/lib/llvm-22 and what its symlinks lead to) the same
# way before both cases: with the recorder's own --cold, recording only `true`.
evict() {
  "$INCFS" record-trace -o evict.parquet --root /usr/lib/llvm-22 --cold -- true 2> /dev/null
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

# clang timed by bash's `time` (real, user, sys in seconds), the same way with and without
# the recorder: under load from other work, user+sys (the probe's programs run in clang's
# context and count as its sys time) is steadier than wall time.
timed_clang='TIMEFORMAT="%R %U %S"; time clang-22 -c hello.c'

overhead() {
  local mode=$1
  : > plain.t; : > rec.t; : > total.us; : > lost; : > events
  for _ in $(seq "$N"); do
    # Other work on the machine may drop caches: warm means warmed right before.
    if [ "$mode" = cold ]; then evict; else clang-22 -c hello.c; fi
    bash -c "$timed_clang" 2>> plain.t
    if [ "$mode" = cold ]; then evict; else clang-22 -c hello.c; fi
    t0=$(now_us)
    "$INCFS" record-trace -o t.parquet --root /usr/lib/llvm-22 -- bash -c "$timed_clang" 2> rec.err
    t1=$(now_us)
    echo $((t1 - t0)) >> total.us
    grep -E '^[0-9.]+ [0-9.]+ [0-9.]+$' rec.err >> rec.t
    # "incfs: E events, ... lost_events: L -> t.parquet"
    sed -n 's/^incfs: \([0-9]*\) events.*lost_events: \([0-9]*\).*/\1 \2/p' rec.err > parsed
    awk '{print $1}' parsed >> events
    awk '{print $2}' parsed >> lost
  done
  pr=$(awk '{printf "%d\n", $1 * 1e6}' plain.t | median); rr=$(awk '{printf "%d\n", $1 * 1e6}' rec.t | median)
  pc=$(awk '{printf "%d\n", ($2 + $3) * 1e6}' plain.t | median); rc=$(awk '{printf "%d\n", ($2 + $3) * 1e6}' rec.t | median)
  pct() { awk -v p="$1" -v c="$2" 'BEGIN{printf "%+.1f%%", (c-p)*100/p}'; }
  echo "$mode: clang wall median plain ${pr} us, recorded ${rr} us ($(pct "$pr" "$rr")); clang cpu (user+sys) median plain ${pc} us, recorded ${rc} us ($(pct "$pc" "$rc")); whole incfs run median $(median < total.us) us; events median $(median < events); lost max $(sort -n lost | tail -1); N=$N"
}

rate() {
  # 1-byte reads of a cached file: one get_pages event per read(2). Two readers, one per core.
  # kernel.bpf_stats_enabled is switched on for the run so the recorder logs the probe's
  # mean cost per program run; the drain thread logs the rate it sustains while busy.
  head -c $((64 << 20)) /dev/urandom > data
  cat data > /dev/null
  local count=${RATE_READS:-4000000}
  local script="dd if=data of=/dev/null bs=1 count=$count status=none & dd if=data of=/dev/null bs=1 count=$count status=none; wait"
  t0=$(now_us); sh -c "$script"; t1=$(now_us)
  echo "rate: plain: 2 x $count one-byte reads in $((t1 - t0)) us"
  local stats_was
  stats_was=$(cat /proc/sys/kernel/bpf_stats_enabled)
  echo 1 > /proc/sys/kernel/bpf_stats_enabled
  for mib in 64 256; do
    RUST_LOG=incfs_recorder=info "$INCFS" record-trace -o rate.parquet --no-opens --ring-buffer-mib "$mib" -- sh -c "$script" 2> rec.err
    line=$(grep '^incfs: [0-9]* events' rec.err)
    ev=$(echo "$line" | awk '{print $2}')
    secs=$(echo "$line" | sed -n 's/.* in \([0-9.]*\) s.*/\1/p')
    lost=$(echo "$line" | sed -n 's/.*lost_events: \([0-9]*\).*/\1/p')
    drain=$(sed 's/\x1b\[[0-9;]*m//g' rec.err | sed -n 's/.*drain thread.*mrecords_per_s=\([0-9.]*\).*/\1/p')
    cost=$(sed 's/\x1b\[[0-9;]*m//g' rec.err | sed -n 's/.*program="mm_filemap_get_pages" runs=\([0-9]*\) mean_ns=\([0-9.]*\).*/\2/p')
    echo "rate: ring ${mib} MiB: $ev events in $secs s = $(awk -v e="$ev" -v s="$secs" 'BEGIN{printf "%.2f", e/s/1e6}') M events/s, lost $lost; drain thread $(printf %.1f "$drain") M records/s while busy; probe get_pages $(printf %.0f "$cost") ns/run"
  done
  echo "$stats_was" > /proc/sys/kernel/bpf_stats_enabled
}

echo "machine: $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
case $what in
  overhead) overhead warm; overhead cold ;;
  rate) rate ;;
  all) overhead warm; overhead cold; rate ;;
  *) echo "usage: $0 [overhead|rate|all]" >&2; exit 2 ;;
esac
