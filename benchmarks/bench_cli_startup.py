"""How fast the CLI answers before any work: `--help`, `--version` and a usage error, each in a
fresh interpreter, against the baseline of a bare `import torch` (what every one of them paid
before arguments were parsed ahead of the torch import), measured in the same run.

    python benchmarks/bench_cli_startup.py [--reps 5]

Prints a JSON list of {case, median_s, min_s, torch_imported}; `torch_imported` is read inside
the child after the command ran (sys.modules), so it does not depend on the machine's speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys
argv = sys.argv[1:]
if argv == ["import-torch"]:
    import torch  # noqa: F401
else:
    from wanengine import cli
    try:
        cli.main(argv)
    except SystemExit:
        pass
sys.stderr.write("TORCH=%d\n" % ("torch" in sys.modules))
"""
CASES = {
    "baseline: python -c 'import torch'": ["import-torch"],
    "wanengine --help": ["--help"],
    "wanengine i2v --help": ["i2v", "--help"],
    "wanengine --version": ["--version"],
    "wanengine i2v --bogus (unknown flag)": ["i2v", "--bogus"],
    "wanengine i2v ... --frame-num 80 (bad value)": ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p",
                                                     "--frame-num", "80"],
    "wanengine i2v --image /no/such.png (missing file)": ["i2v", "--ckpt-dir", ".", "--image", "/no/such.png",
                                                          "--prompt", "p"],
    "wanengine plan --size 1280*720 --hardware h100": ["plan", "--size", "1280*720", "--hardware", "h100"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    results = []
    for name, argv in CASES.items():
        times, imported = [], None
        for _ in range(args.reps):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT,
                                  env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "80"})
            times.append(time.perf_counter() - start)
            imported = "TORCH=1" in done.stderr
        results.append({"case": name, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                        "torch_imported": imported})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
