"""The checkpoint preflight (`io.checkpoint.preflight_checkpoint`: headers only, models built on
the meta device) on the golden checkpoint, each run in a fresh interpreter, against the
baseline of the same preflight with `nn.Embedding`'s own initialisation on the meta device
(what the text encoder's embeddings did before `models.t5.Embedding` skipped it: `normal_` on
meta imports `torch._dynamo`), measured in the same run.

    python benchmarks/bench_preflight.py [--reps 5] [--ckpt ../shared/golden/ckpt]

Prints a JSON list of {case, median_s, min_s, dynamo_imported}; the time is the preflight call
alone (torch already imported), read inside the child.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys, time
import torch
from torch import nn
if sys.argv[2] == "baseline":
    from wanengine.models import t5
    t5.Embedding.reset_parameters = nn.Embedding.reset_parameters
from wanengine.io.checkpoint import preflight_checkpoint
start = time.perf_counter()
preflight_checkpoint(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "dynamo": "torch._dynamo" in sys.modules}))
""".replace("import sys, time", "import json, sys, time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ckpt", default=str(ROOT.parent / "shared" / "golden" / "ckpt"))
    args = parser.parse_args()
    results = []
    for case in ("baseline", "current"):
        runs = []
        for _ in range(args.reps):
            done = subprocess.run([sys.executable, "-c", CHILD, args.ckpt, case], capture_output=True, text=True,
                                  cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        times = [r["seconds"] for r in runs]
        results.append({"case": case, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                        "dynamo_imported": all(r["dynamo"] for r in runs)})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
