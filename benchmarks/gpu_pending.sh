#!/usr/bin/env bash
# One device call for what was written on a CPU and waits for a GPU (docs/benchmarks.md
# says which). Now: the ``wide`` grid of tune_pod.py (8-warp programs capped at 128
# registers, two an SM; each tiling's outputs checked against the default's) over every
# cell of `vattn bench pod` (CELLS=<subset> for fewer), 50:50. Logs and JSON under $OUT;
# the summary prints last. Still owed on an H200: `python3 -m vattn bench decode --cases b
# --batches 8,16,32 --repeats 30` and `python3 -m vattn bench pod --policy 50:50`
# (gpu_pending_2.sh runs the latter after the whole GPU suite).
source "$(dirname "$0")/gpu_setup.sh"
timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/tune_pod.py --grid wide \
    --cells "${CELLS:-grid}" --policies 50:50 --repeats 10 \
    --json "$out/tune-pod-wide.json" > "$out/tune-pod-wide.log" 2>&1
grep -E "registers|OutOfResources|Error" "$out/tune-pod-wide.log" | sort | uniq -c | sort -rn | head -12
python3 - "$out/tune-pod-wide.json" <<'PY'
import json, math, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
by = collections.defaultdict(dict)
for r in rows:
    by[r["tiling"]][r["cell"]] = r
base = "m64 n64 nd64 sauto w4 st3 shift"      # the default
for t, cells in by.items():
    common = [c for c in cells if c in by[base]]
    def geo(xs): return math.exp(sum(map(math.log, xs)) / len(xs))
    rel = [by[base][c]["pod us"] / cells[c]["pod us"] for c in common]
    own = [(by[base][c]["pod prefill us"] + by[base][c]["pod decode us"]) / cells[c]["pod us"] for c in common]
    gp = geo([by[base][c]["pod prefill us"] / cells[c]["pod prefill us"] for c in common])
    gd = geo([by[base][c]["pod decode us"] / cells[c]["pod decode us"] for c in common])
    print(f"{t:42s} cells {len(common):2d} speed vs default {geo(rel):.3f} ({min(rel):.3f}/{max(rel):.3f})"
          f" vs default's halves {geo(own):.3f} min {min(own):.3f} prefill half {gp:.3f} decode half {gd:.3f}")
PY
