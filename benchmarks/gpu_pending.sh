#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
# Now: the lanes grid of tune_pod.py over the 54 cells of `vattn bench pod` (the default
# first; each tiling's outputs checked against the default's), the lanes grid of
# tune_decode.py on four shapes, then the pod GPU tests (`decode_lanes` in the sweep test).
source "$(dirname "$0")/gpu_setup.sh"
timeout "${SWEEP_TIMEOUT:-300}" python3 benchmarks/tune_pod.py --grid lanes --cells "${CELLS:-grid}" \
    --policies 50:50 --repeats 10 --json "$out/tune-pod-lanes.json" > "$out/tune-pod-lanes.log" 2>&1
timeout "${DECODE_TIMEOUT:-80}" python3 benchmarks/tune_decode.py --grid lanes --repeats 20 \
    --shapes a-512,a-8k,b-8-unequal,b-32 --json "$out/tune-decode-lanes.json" \
    > "$out/tune-decode-lanes.log" 2>&1
timeout "${POD_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q tests/test_pod.py 2>&1 | tee "$out/pytest-pod.log" | tail -3
tail -9 "$out/tune-decode-lanes.log"
python3 - "$out/tune-pod-lanes.json" <<'PY'
import json, math, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
by = collections.defaultdict(dict)
for r in rows:
    by[r["tiling"]][r["cell"]] = r
base = next(t for t in by if "lanes" not in t)
for t, cells in by.items():
    common = [c for c in cells if c in by[base]]
    g = math.exp(sum(math.log(cells[c]["vs serial"]) for c in common) / len(common))
    rel = [by[base][c]["pod us"] / cells[c]["pod us"] for c in common]
    gd = math.exp(sum(math.log(by[base][c]["pod decode us"] / cells[c]["pod decode us"]) for c in common) / len(common))
    print(f"{t:45s} cells {len(common):2d} vs b2b {g:.3f} min {min(cells[c]['vs serial'] for c in common):.3f}"
          f" speed vs default {math.exp(sum(map(math.log, rel)) / len(rel)):.3f} ({min(rel):.3f}/{max(rel):.3f}) decode half {gd:.3f}")
PY
