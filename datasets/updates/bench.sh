#!/usr/bin/env bash
# The update bench (issue 19): the first planned start of version 2 of a tree over an
# emulated link, with version 1 cached under the same cache root against an empty cache.
# Usage: bench.sh PAIR OUT_DIR  (PAIR: numpy or python, see build-pair.sh)
# Environment: INCFS (the incfs binary, default: target/release/incfs), RUNS (rounds, 3),
# LATENCY_MS (20), BANDWIDTH_MBIT (100). Run as root (it drops the page cache before each
# measured start). Prints a Markdown table and writes OUT_DIR/results.json.
#
# Flow, as a user would do it: v1 is packed, planned from two mount read-logs of its start
# and relaid hot-first; a user runs it and ends up with all of it cached (a read of every
# file through `incfs run`, as the background fill would leave it). v2 is packed, v1's plan
# is carried over to it (`incfs plan carry`: no trace of v2 exists yet) and v2 is relaid
# hot-first with the carried plan, with `--base v1` (v2-base.img) and without (v2-hot.img).
# Measured, interleaved, RUNS rounds, page cache dropped, on each of the two images:
#   v2 + carried plan, empty cache      (what a v2 start costs without v1)
#   v2 + carried plan, v1 cached        (the update: v1's chunks come from its cache)
# Both runs use --no-fill, so bytes are the start's own. Beside them: the bytes of
# `zstd --patch-from` of v1's tree (as a tar) for v2's whole tree, and of v2's tar.zst.
set -euo pipefail
pair=${1:?usage: bench.sh numpy|python OUT_DIR}
out=$(realpath -m "${2:?usage: bench.sh numpy|python OUT_DIR}")
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
incfs=${INCFS:-$root/target/release/incfs}
runs=${RUNS:-3}
latency=${LATENCY_MS:-20}
bw=${BANDWIDTH_MBIT:-100}
case "$pair" in
  numpy)  cmd="import numpy" ;;
  python) cmd="import sympy, networkx" ;;
  *) echo "bench.sh: unknown pair $pair" >&2; exit 2 ;;
esac
[ -x "$incfs" ] || { echo "bench.sh: no incfs binary at $incfs (cargo build --release -p incfs-cli, or set INCFS)" >&2; exit 1; }
command -v zstd >/dev/null || { echo "bench.sh: needs zstd (apt-get install zstd)" >&2; exit 1; }

mkdir -p "$out/serve"
"$here/build-pair.sh" "$pair" "$out/trees"
t1=$out/trees/v1 t2=$out/trees/v2 s=$out/serve
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
serve() { # serve VAR LOG [link args]: starts incfs serve on a free port, sets VAR to its URL
  local var=$1 log=$2 url=; shift 2
  "$incfs" serve "$s" --listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    url=$(sed -n 's|^serving .* at \(http[^ ]*[^/]\)/*$|\1|p' "$log" 2>/dev/null | head -1)
    [ -n "$url" ] && break
    sleep 0.1
  done
  [ -n "$url" ] || { echo "bench.sh: incfs serve did not start: $(cat "$log")" >&2; exit 1; }
  printf -v "$var" '%s' "$url"
}
serve fast "$out/serve-fast.log"
serve slow "$out/serve-slow.log" --latency-ms "$latency" --bandwidth-mbit "$bw"
run() { # run IMAGE_URL CACHE STATS [incfs run args...]: the workload through incfs run
  local url=$1 cache=$2 stats=$3; shift 3
  "$incfs" run --image "$url" --cache "$cache" --stats-json "$stats" --no-fill "$@" \
    --env 'PYTHONPATH={mnt}' --env PYTHONDONTWRITEBYTECODE=1 -- python3 -c "$cmd" >/dev/null
}

"$incfs" pack "$t1" -o "$s/v1.img" >/dev/null
"$incfs" pack "$t2" -o "$s/v2.img" >/dev/null
for i in 1 2; do
  rm -rf "$out/c"
  run "$fast/v1.img" "$out/c" /dev/null --read-log-out "$out/v1.run$i.ndjson"
done
"$incfs" plan "$out/v1.run1.ndjson" "$out/v1.run2.ndjson" --image "$s/v1.img" -o "$out/v1.plan.json" >/dev/null
"$incfs" relayout "$s/v1.img" --plan "$out/v1.plan.json" -o "$s/v1-hot.img" --plan-out "$out/v1-hot.plan.json" >/dev/null
"$incfs" plan carry "$out/v1-hot.plan.json" --from "$s/v1-hot.img" --image "$s/v2.img" -o "$out/v2.carried.json" --json >"$out/carry.json"
"$incfs" relayout "$s/v2.img" --plan "$out/v2.carried.json" -o "$s/v2-hot.img" --plan-out "$out/v2-hot.plan.json" >/dev/null
"$incfs" relayout "$s/v2.img" --plan "$out/v2.carried.json" -o "$s/v2-base.img" --plan-out "$out/v2-base.plan.json" --base "$s/v1-hot.img" >/dev/null
"$incfs" diff "$s/v1-hot.img" "$s/v2-base.img" --json >"$out/diff.json"
# v1 used and wholly cached.
rm -rf "$out/v1-cache" "$out/c"
"$incfs" run --image "$fast/v1-hot.img" --cache "$out/v1-cache" --prefetch "$out/v1-hot.plan.json" \
  -- sh -c 'find "$1" -type f -exec cat {} + >/dev/null' sh '{mnt}' >/dev/null

measure() { # measure LABEL ROUND CACHE_SEED IMAGE: v2's planned start from IMAGE (v2-hot, v2-base)
  local label=$1 round=$2 seed=$3 image=$4 c=$out/c
  rm -rf "$c"
  if [ -n "$seed" ]; then cp -a "$seed" "$c"; else mkdir -p "$c"; fi
  sync; echo 3 >/proc/sys/vm/drop_caches
  curl -s "$slow/.incfs-serve/stats?reset" >/dev/null
  run "$slow/$image.img" "$c" "$out/run.json" --prefetch "$out/$image.plan.json"
  curl -s "$slow/.incfs-serve/stats" >"$out/serve.json"
  python3 - "$label" "$round" "$out/run.json" "$out/serve.json" >>"$out/samples.ndjson" <<'PY'
import json, sys
label, rnd, run, serve = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
print(json.dumps({"method": label, "round": rnd, "seconds": run["wall_ms"] / 1000,
                  "bytes_moved": serve["bytes_sent"], "requests": serve["requests"],
                  "chunks_seeded": run["stats"].get("chunks_seeded", 0),
                  "bytes_seeded": run["stats"].get("bytes_seeded", 0)}))
PY
}
rm -f "$out/samples.ndjson"
for r in $(seq "$runs"); do
  measure "v2 + carried plan, empty cache" "$r" "" v2-base
  measure "v2 + carried plan, v1 cached" "$r" "$out/v1-cache" v2-base
  measure "v2 + carried plan, empty cache (relayout without --base)" "$r" "" v2-hot
  measure "v2 + carried plan, v1 cached (relayout without --base)" "$r" "$out/v1-cache" v2-hot
done
rm -rf "$out/c"

# The delta baseline: zstd --patch-from of v1's tree for v2's whole tree.
tar -C "$t1" --sort=name -cf "$out/v1.tar" .
tar -C "$t2" --sort=name -cf "$out/v2.tar" .
win=$(python3 -c "import os,math; print(max(10, math.ceil(math.log2(max(os.path.getsize('$out/v1.tar'), os.path.getsize('$out/v2.tar'))))))")
zstd -q -f -19 --long="$win" --patch-from="$out/v1.tar" "$out/v2.tar" -o "$out/v2.patch.zst"
zstd -q -f -19 --long="$win" "$out/v2.tar" -o "$out/v2.tar.zst"
rm -f "$out/v1.tar" "$out/v2.tar"

python3 - "$out" "$pair" "$latency" "$bw" <<'PY'
import json, os, statistics, sys
out, pair, lat, bw = sys.argv[1:5]
samples = [json.loads(l) for l in open(f"{out}/samples.ndjson")]
diff, carry = json.load(open(f"{out}/diff.json")), json.load(open(f"{out}/carry.json"))
by = {}
for s in samples:
    by.setdefault(s["method"], []).append(s)
med = {m: {k: statistics.median(x[k] for x in v) for k in ("seconds", "bytes_moved", "requests", "bytes_seeded")} for m, v in by.items()}
patch, full = os.path.getsize(f"{out}/v2.patch.zst"), os.path.getsize(f"{out}/v2.tar.zst")
res = {"pair": pair, "latency_ms": int(lat), "bandwidth_mbit": float(bw), "medians": med,
       "samples": samples, "diff_total": diff["total"], "carry": carry,
       "zstd_patch_from_bytes": patch, "v2_tar_zst_bytes": full}
json.dump(res, open(f"{out}/results.json", "w"), indent=2)
mb = lambda b: f"{b / 1e6:.2f} MB"
t = diff["total"]
print(f"### {pair}: {lat} ms / {bw} Mbit/s, medians of {len(samples) // max(1, len(by))} rounds\n")
print("| v2 start | seconds | bytes moved | requests | from v1's cache |")
print("|---|---|---|---|---|")
for m, v in med.items():
    print(f"| {m} | {v['seconds']:.2f} | {mb(v['bytes_moved'])} | {v['requests']:.0f} | {mb(v['bytes_seeded'])} raw |")
e, c = med.get("v2 + carried plan, empty cache"), med.get("v2 + carried plan, v1 cached")
if e and c and e["bytes_moved"]:
    print(f"\nv1 cached / empty: {c['bytes_moved'] / e['bytes_moved']:.2f}x the bytes")
print(f"\nwhole v2 image, chunks v1 lacks (incfs diff): {mb(t['stored_bytes'] - t['shared_stored_bytes'])} stored of {mb(t['stored_bytes'])} "
      f"({100 * t['shared_raw_bytes'] / max(1, t['raw_bytes']):.1f} % of raw bytes shared)")
print(f"zstd --patch-from v1.tar for v2.tar: {mb(patch)} (v2.tar.zst alone: {mb(full)})")
print(f"carried plan: {carry['chunks_in']} chunks in: {carry['kept']} kept, {carry['moved']} moved, {carry['changed']} changed, {carry['dropped']} dropped")
PY
