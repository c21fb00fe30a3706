#!/usr/bin/env python3
"""How many bytes of the bulk sidecar a start needs, if the fill knew its demand set.

A lower bound for a start without a plan: the fill has to have moved at least every sidecar
frame that holds a chunk the start reads before the start can end (demand misses fetch the
image's own, larger-per-chunk frames, so they do not lower it). The demand set comes from a
plan of recorded runs (`incfs plan T... --image IMG -o PLAN`), the chunk slots of each file
from `incfs inspect IMG --json`, the frames from the sidecar's index.

  usage: bulk-oracle.py PLAN.json INSPECT.json IMG.bulk [MBIT]
"""
import json
import sys


def varint(b, i):
    v = shift = 0
    while True:
        x = b[i]
        i += 1
        v |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return v, i


def frames(path):
    """The sidecar's index (postcard `Vec<BulkFrame>`): (stored len, [slot runs]) per frame."""
    with open(path, "rb") as f:
        head = f.read(48)
        if head[:8] != b"INCFSBK1":
            sys.exit(f"{path}: not a bulk sidecar")
        index = f.read(int.from_bytes(head[40:48], "little"))
    n, i = varint(index, 0)
    out = []
    for _ in range(n):
        _offset, i = varint(index, i)
        length, i = varint(index, i)
        _raw, i = varint(index, i)
        i += 1  # dictionary (u8)
        runs, i = varint(index, i)
        slots = []
        for _ in range(runs):
            first, i = varint(index, i)
            count, i = varint(index, i)
            slots.append((first, count))
        out.append((length, slots))
    return out


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    plan = json.load(open(sys.argv[1]))
    first = {
        e["path"]: e["first_chunk"]
        for e in json.load(open(sys.argv[2]))["entries"]
        if e["kind"] == "file"
    }
    mbit = float(sys.argv[4]) if len(sys.argv) > 4 else 100.0
    wanted = set()
    for e in plan["entries"]:
        base = first.get(e["file"])
        if base is None:
            sys.exit(f"{sys.argv[1]}: {e['file']} is not a file of the image")
        wanted.update(range(base + e["first_chunk"], base + e["first_chunk"] + e["chunk_count"]))
    fr = frames(sys.argv[3])
    total = sum(length for length, _ in fr)
    needed = [
        length
        for length, runs in fr
        if any(s in wanted for a, c in runs for s in range(a, a + c))
    ]
    need = sum(needed)
    secs = need * 8 / (mbit * 1e6)
    print(
        f"demand set: {len(wanted)} chunks, {plan['total_bytes'] / 1e6:.1f} MB in the image's frames\n"
        f"sidecar: {len(fr)} frames, {total / 1e6:.1f} MB; frames holding a demanded chunk: "
        f"{len(needed)}, {need / 1e6:.1f} MB ({need / total:.0%})\n"
        f"those frames alone take {secs:.2f} s at {mbit:g} Mbit/s"
    )


main()
