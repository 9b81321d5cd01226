#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
# Now: the decode-loop grid of tune_pod.py (the default first, then `decode_lanes`,
# `decode_prefetch` 4 and 8, both; each tiling's outputs checked against the default's)
# over 18 cells of `vattn bench pod`'s 54 (every chunk and prefix, 32 decodes at 16K and
# 64 at 4K; CELLS=grid for all), the lanes grid of tune_decode.py on four shapes, then the
# pod GPU tests (both options in the sweep test).
source "$(dirname "$0")/gpu_setup.sh"
subset=512:0:32:16384,512:0:64:4096,512:4096:32:16384,512:4096:64:4096,512:16384:32:16384
subset=$subset,512:16384:64:4096,1024:0:32:16384,1024:0:64:4096,1024:4096:32:16384
subset=$subset,1024:4096:64:4096,1024:16384:32:16384,1024:16384:64:4096,2048:0:32:16384
subset=$subset,2048:0:64:4096,2048:4096:32:16384,2048:4096:64:4096,2048:16384:32:16384
subset=$subset,2048:16384:64:4096
timeout "${SWEEP_TIMEOUT:-360}" python3 benchmarks/tune_pod.py --grid decode-loop \
    --cells "${CELLS:-$subset}" --policies 50:50 --repeats 10 \
    --json "$out/tune-pod-decode-loop.json" > "$out/tune-pod-decode-loop.log" 2>&1
timeout "${DECODE_TIMEOUT:-80}" python3 benchmarks/tune_decode.py --grid lanes --repeats 20 \
    --shapes a-512,a-8k,b-8-unequal,b-32 --json "$out/tune-decode-lanes.json" \
    > "$out/tune-decode-lanes.log" 2>&1
timeout "${POD_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q tests/test_pod.py 2>&1 | tee "$out/pytest-pod.log" | tail -3
tail -9 "$out/tune-decode-lanes.log"
python3 - "$out/tune-pod-decode-loop.json" <<'PY'
import json, math, sys, collections
rows = json.load(open(sys.argv[1]))["rows"]
by = collections.defaultdict(dict)
for r in rows:
    by[r["tiling"]][r["cell"]] = r
base = next(t for t in by if " lanes" not in t and " pf" not in t)     # the default
for t, cells in by.items():
    common = [c for c in cells if c in by[base]]
    g = math.exp(sum(math.log(cells[c]["vs serial"]) for c in common) / len(common))
    rel = [by[base][c]["pod us"] / cells[c]["pod us"] for c in common]
    gd = math.exp(sum(math.log(by[base][c]["pod decode us"] / cells[c]["pod decode us"]) for c in common) / len(common))
    print(f"{t:45s} cells {len(common):2d} vs b2b {g:.3f} min {min(cells[c]['vs serial'] for c in common):.3f}"
          f" speed vs default {math.exp(sum(map(math.log, rel)) / len(rel)):.3f} ({min(rel):.3f}/{max(rel):.3f}) decode half {gd:.3f}")
PY
