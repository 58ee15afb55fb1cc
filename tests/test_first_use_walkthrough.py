"""What a fresh-clone walkthrough of the README tripped over, kept fixed: mistyped paths are
reported before torch is imported, `plan` runs without torch, no help text is cut off at 80
columns, `--version` works after the command, the checkpoint preflight does not pull in
torch._dynamo (1-2 s of every run, `info` and `demo`, through a meta-device `normal_`), and
the console script skips the interpreter's teardown (time no stage table can show)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

_SCRIPT = r"""
import contextlib, io, json, sys
from wanengine import cli
ckpt, image = sys.argv[1], sys.argv[2]
run = ["i2v", "--ckpt-dir", ckpt, "--image", image, "--prompt", "p", "--size", "64*48", "--frame-num", "1"]
cases = {
    "version_after": ["i2v", "--image", "x", "--version"],
    "plan": ["plan", "--weights", "int8", "--hardware", "h200", "--json"],
    "plan_bad_weights": ["plan", "--weights", "int4"],
    "missing_image": [*run[:3], "--image", "/nonexistent/cat.jpg", *run[5:]],
    "image_is_dir": [*run[:3], "--image", ckpt, *run[5:]],
    "missing_ckpt": ["i2v", "--ckpt-dir", "/nonexistent/Wan2.2-I2V-A14B", *run[3:]],
    "missing_lora": [*run, "--lora-high", "/nonexistent/high.safetensors"],
    "missing_table": [*run, "--step-cache", "mag", "--cache-threshold", "0.1", "--cache-table", "/nonexistent/t.json"],
    "out_in_missing_dir": [*run, "--out", "/nonexistent/dir/x.mp4"],
    "out_bad_extension": [*run, "--out", "x.avi"],
    "metrics_in_missing_dir": [*run, "--metrics-json", "/nonexistent/dir/m.json"],
    **{f"help {command}": [command, "--help"] for command in ("i2v", "plan", "info", "convert", "demo", "serve",
                                                               "calibrate-cache")},
}
result = {}
for name, argv in cases.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    result[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def torch_free_run(golden):
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "TERM": "dumb"}  # no RANK
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(golden / "ckpt"), str(golden / "input.png")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_mistyped_paths_and_plan_need_no_torch(torch_free_run):
    for name, result in torch_free_run.items():
        assert result["torch"] is False, name
        if name.startswith("help "):  # at 80 columns no help text is cut off either
            assert result["code"] == 0 and "Usage:" in result["out"] and "\u2026" not in result["out"], name
    assert torch_free_run["version_after"]["code"] == 0
    assert torch_free_run["version_after"]["out"].startswith("wanengine ")
    plan = torch_free_run["plan"]
    assert plan["code"] == 0 and json.loads(plan["out"])["weights"] == "int8"
    expected = {"plan_bad_weights": "--weights: 'int4'",
                "missing_image": "--image: /nonexistent/cat.jpg: file not found",
                "image_is_dir": "is a directory",
                "missing_ckpt": "--ckpt-dir: /nonexistent/Wan2.2-I2V-A14B",
                "missing_lora": "/nonexistent/high.safetensors: adapter file not found",
                "missing_table": "/nonexistent/t.json: file not found",
                "out_in_missing_dir": "--out: /nonexistent/dir/x.mp4: directory /nonexistent/dir does not exist",
                "out_bad_extension": "--out: x.avi: unsupported extension '.avi'",
                "metrics_in_missing_dir": "--metrics-json: /nonexistent/dir/m.json: directory"}
    for name, words in expected.items():
        result = torch_free_run[name]
        lines = result["err"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1 and words in lines[0], (name, result)


_DYNAMO = r"""
import sys
import torch
from torch import nn
from wanengine.io.checkpoint import preflight_checkpoint
from wanengine.models.t5 import Embedding
preflight_checkpoint(sys.argv[1])
print("torch._dynamo" in sys.modules)
torch.manual_seed(0)
ours = Embedding(50, 8).weight
torch.manual_seed(0)
print(torch.equal(ours, nn.Embedding(50, 8).weight))  # off the meta device: torch's own init
"""


def test_checkpoint_preflight_does_not_import_dynamo(golden):
    done = subprocess.run([sys.executable, "-c", _DYNAMO, str(golden / "ckpt")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], done.stdout


_EXIT = r"""
import atexit, sys, threading
from wanengine import cli

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

kept = Finalized()  # dropped only by the interpreter's teardown
atexit.register(lambda: print("atexit", flush=True))
if sys.argv[1] == "thread":  # a non-daemon thread still running: the ordinary exit waits for it
    threading.Thread(target=__import__("time").sleep, args=(0.2,)).start()
sys.argv = ["wanengine", "plan", "--frame-num", "8"]
cli.main()
"""


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_the_console_script_skips_the_interpreter_teardown(case):
    """With torch loaded the teardown takes 0.5-1 s after the stage table (a run's 'total' is then
    short of `time`'s wall); atexit handlers still run, and the exit code is kept."""
    done = subprocess.run([sys.executable, "-c", _EXIT, case], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    assert done.returncode == 2 and "--frame-num" in done.stderr, done.stderr
    assert done.stdout.split() == (["atexit"] if case == "plain" else ["atexit", "finalized"]), done.stdout
