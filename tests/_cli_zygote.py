"""Run many CLI invocations as separate processes without paying torch's import for each.

Usage: python _cli_zygote.py CASES.json RESULTS.json. The parent imports the CLI (and torch,
PIL, ...) once and runs no tensor work; each case is a fork() that chdirs, sets its
environment, sends stdout/stderr to files, calls `wanengine.cli.main(args)` and exits with
its code. So every case is a real process with its own exit status and streams, as a
subprocess would be, at ~0.1 s instead of ~3 s of start-up. Results: exit code, stdout,
stderr and elapsed seconds per case.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_case(case: dict, work: Path, index: int) -> dict:
    out_path, err_path = work / f"case{index}.out", work / f"case{index}.err"
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.chdir(case["cwd"])
            os.environ.clear()
            os.environ.update(case["env"])
            for fd, name in ((1, out_path), (2, err_path)):
                handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            from wanengine import cli

            try:
                cli.main(case["args"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # the CLI must never get here; report it as the test's failure
            import traceback

            traceback.print_exc()
            code = 71 if not isinstance(exc, SystemExit) else code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    return {"name": case["name"], "code": os.waitstatus_to_exitcode(status), "elapsed": elapsed,
            "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace")}


def warm_up() -> None:
    """Import here what every case needs (torch, the CLI and its lazily imported parsing and
    preflight modules), so the children inherit it; no tensor work runs in this process."""
    import torch
    import PIL.PngImagePlugin  # noqa: F401
    import safetensors.torch  # noqa: F401

    import wanengine.demo  # noqa: F401
    import wanengine.engine  # noqa: F401
    import wanengine.memory_check  # noqa: F401
    import wanengine.models.dit_loading  # noqa: F401
    import wanengine.plan  # noqa: F401
    import wanengine.run  # noqa: F401
    from wanengine import cli
    from wanengine.models.t5 import T5Config, UMT5Encoder

    with torch.device("meta"):  # nn.Embedding's init on meta imports torch._dynamo once (~1-2 s)
        UMT5Encoder(T5Config(vocab_size=8, dim=8, dim_attn=8, dim_ffn=8, num_heads=1, num_layers=1, num_buckets=2))

    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)
    try:  # a parse error runs typer's lazily imported parsing machinery once, here
        cli.main(["i2v", "--ckpt-dir", ".", "--image", ".", "--prompt", "p", "--seed", "not-a-number"])
    except SystemExit:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    work = Path(sys.argv[2]).parent
    warm_up()

    results = [run_case(case, work, index) for index, case in enumerate(cases)]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
