"""What any scheduling of `pod_attention`'s two kinds of tiles could reach over the grid of
a `vattn bench pod` run, given how fast each kind runs beside the other.

The model: every SM runs one prefill and one decode program until one kind runs out,
the prefill at `rp` and the decode at `rd` of the rate of its own launch (measured by
`benchmarks/trace_pod.py`: 0.55-0.57 and 0.56-0.60 on an H200); then the other kind runs
alone at its full rate. Nothing is charged for the hand-over, so this bounds a policy
from above. Prints the geometric mean and the range of the speedup over back to back.

    python3 benchmarks/pod_bound.py docs/data/pod-h200-50-50-e66dd6e.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from vattn.bench import common
from vattn.bench.pod import summary


def fused_us(prefill: float, decode: float, rp: float, rd: float) -> float:
    """The model's fused time for halves of `prefill` and `decode` us alone."""
    together = min(prefill / rp, decode / rd)
    return together + (decode - together * rd if prefill / rp <= decode / rd
                       else prefill - together * rp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=pathlib.Path, help="a `vattn bench pod --json` file")
    parser.add_argument("--rates", default="0.55:0.56,0.57:0.60,0.65:0.65,0.70:0.70,0.71:0.87",
                        help="RP:RD,... (0.71:0.87: each kind at its speed alone on the SM)")
    args = parser.parse_args()
    cells = json.loads(args.json.read_text())["rows"]
    table = []
    for pair in args.rates.split(","):
        rp, rd = (float(v) for v in pair.split(":"))
        modelled = [{"vs back-to-back": c["back-to-back us"] / fused_us(
            c["prefill us"], c["decode us"], rp, rd)} for c in cells]
        totals = summary(modelled)
        table.append({"prefill rate": rp, "decode rate": rd,
                      "geomean vs back-to-back": totals["geomean vs back-to-back"],
                      "min": round(totals["min vs back-to-back"], 3),
                      "max": round(max(m["vs back-to-back"] for m in modelled), 3)})
    print(common.markdown_table(table))


if __name__ == "__main__":
    main()
