#!/usr/bin/env bash
# One measured `incfs run` of a workload's start against an image served by `incfs serve`
# (with link emulation), page cache dropped and a fresh cache: prints seconds, bytes and
# requests. Used to choose the fetch policy's defaults (BENCHMARKS.md, "Fast without a
# plan"); run it several times per setting, interleaved, on a quiet machine.
#   usage: fetch-policy.sh INCFS URL LABEL [incfs run args...] -- CMD...
#   e.g.   fetch-policy.sh target/release/incfs http://127.0.0.1:18080/image.img lazy \
#            --miss-amplify 256K -- '{mnt}/bin/clang' -c '{mnt}/hello.c' -o /tmp/hello.o
# (root: it drops the page cache).
set -euo pipefail
incfs=$1 url=$2 label=$3
shift 3
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
sync
echo 3 > /proc/sys/vm/drop_caches
cache=$(mktemp -d)
stats=$(mktemp)
trap 'rm -rf "$cache" "$stats"' EXIT
"$incfs" run --image "$url" --cache "$cache" --stats-json "$stats" "${args[@]}" -- "$@" >/dev/null
python3 - "$stats" "$label" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:32s} {(j['mount_ms'] + j['wall_ms']) / 1000:6.2f} s  "
      f"{j['bytes_fetched'] / 2**20:6.1f} MiB fetched  {j['requests']:5d} requests  "
      f"{j['blocked_reads']:5d} blocked reads ({j['blocked_ms']} ms)")
PY
