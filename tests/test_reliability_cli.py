"""Every hostile input and fault of issues 11/18 through the real CLI, one process per case.

The cases run as forks of one zygote process (tests/_cli_zygote.py) that imported torch
once, so each case is a separate process with its own exit status and streams for ~0.1 s
instead of ~3 s of start-up. For each case: the exit code, exactly one line on stderr naming
the flag or file, no traceback, no temporary file left, and an existing output untouched.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT
from test_cli_errors import _variant

PREVIOUS = b"a previous result that must survive a failed run"
SHARD = "high_noise_model/diffusion_pytorch_model-00002-of-00007.safetensors"
CONFIG = "high_noise_model/config.json"


def _config_change(**values):
    def change(raw: bytes) -> bytes:
        config = json.loads(raw)
        config.update(values)
        return json.dumps(config).encode()
    return change


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) with an empty image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('the pickle ran code')",))


def _nan_vae(golden_ckpt: Path):
    def change(raw: bytes) -> bytes:
        state = torch.load(golden_ckpt / "Wan2.1_VAE.pth", weights_only=True)
        name = next(n for n, t in state.items() if n.startswith("decoder.") and t.is_floating_point() and t.dim() > 1)
        state[name] = torch.full_like(state[name], float("nan"))
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    return change


def _sparse_14b(root: Path, golden_ckpt: Path) -> Path:
    import shutil

    from test_preflight_full_size import _write_sparse_expert

    from wanengine.constants import constants
    from wanengine.models.dit import DiTConfig, WanDiT

    cfg = constants()["i2v_a14b_dit"]
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**{k: cfg[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim",
                                                        "num_heads", "num_layers", "text_len", "eps")}))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for expert in ("high_noise_model", "low_noise_model"):
        _write_sparse_expert(root / expert, shapes)
    shutil.copytree(golden_ckpt / "google", root / "google")
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (root / name).symlink_to(golden_ckpt / name)
    return root


def _cases(tmp: Path, golden: Path, golden_ckpt: Path) -> list:
    """(name, args, env, expected exit code, words the one stderr line must hold, options)."""
    store = tmp / "store"  # files a checkpoint links to, that a run must not overwrite
    store.mkdir()
    (store / "config.json").write_bytes((golden_ckpt / CONFIG).read_bytes())
    linked = _variant(golden_ckpt, tmp / "ckpt-linked", {CONFIG: None})
    (linked / CONFIG).symlink_to(store / "config.json")
    variants = {
        "layers": {CONFIG: _config_change(num_layers=1_000_000_000)},
        "dim": {CONFIG: _config_change(dim=10**18)},
        "textlen": {CONFIG: _config_change(text_len=1_000_000_000)},
        "digits": {CONFIG: lambda raw: raw.replace(b'"dim": 256', b'"dim": ' + b"7" * 5000)},
        "pickle": {"models_t5_umt5-xxl-enc-bf16.pth": lambda raw: _pickled({"w": torch.zeros(1), "x": _Evil()})},
        "nanvae": {"Wan2.1_VAE.pth": _nan_vae(golden_ckpt)},
        "shard-dir": {SHARD: None},
    }
    ckpts = {name: _variant(golden_ckpt, tmp / f"ckpt-{name}", change) for name, change in variants.items()}
    (ckpts["shard-dir"] / SHARD).mkdir()
    assert b"7777" in (ckpts["digits"] / CONFIG).read_bytes()
    sparse = _sparse_14b(tmp / "ckpt-14b", golden_ckpt)
    (tmp / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    (tmp / "not-a-dir").write_text("a file where the cache directory should be")

    def base(case_dir: Path, **over) -> list:
        args = {"--ckpt-dir": str(golden_ckpt), "--image": str(golden / "input.png"), "--prompt": "a cat",
                "--max-area": "12288", "--frame-num": "5", "--sample-steps": "2", "--device": "cpu",
                "--dtype": "float32", "--out": str(case_dir / "out.mp4")}
        args.update(over)
        return ["i2v"] + [x for key, value in args.items() if value is not None for x in (key, value)]

    long_name = "v" * (255 - len(".mp4")) + ".mp4"  # the longest valid name: its temp name must still fit
    table = [
        ("seed too large", dict(extra=["--seed", str(2**64)]), {}, 2, ["--seed", "2**63-1"]),
        ("seed not a number", dict(extra=["--seed", "abc"]), {}, 2, ["--seed"]),
        ("unknown flag", dict(extra=["--bogus"]), {}, 2, ["--bogus"]),
        ("offload maybe", dict(extra=["--offload_model=maybe"]), {}, 2, ["--offload_model", "maybe"]),
        ("frame num 100001", dict(over={"--frame-num": "100001"}), {}, 2, ["--frame-num", "4093"]),
        ("sample steps 1e6", dict(over={"--sample-steps": "1000000"}), {}, 2, ["--sample-steps", "1000"]),
        ("memory: golden at 4093 frames", dict(over={"--frame-num": "4093"}), {"WANENGINE_MEMORY_GB": "0.5"}, 2,
         ["needs ~", "have 0.5 GB", "--frame-num/--size", "--ignore-memory-check"]),
        ("memory: 14B at 1280x720x81", dict(over={"--ckpt-dir": str(sparse), "--max-area": None, "--size": "1280*720",
                                                  "--frame-num": "81", "--sample-steps": "40", "--dtype": "bfloat16"}),
         {"WANENGINE_MEMORY_GB": "64"}, 2, ["needs ~", "have 64.0 GB"]),
        ("metrics is a FIFO", dict(metrics="fifo.json"), {}, 2, ["--metrics-json", "FIFO"]),
        ("metrics is a directory", dict(metrics="."), {}, 2, ["--metrics-json", "directory"]),
        ("metrics symlink outside", dict(metrics="link.json"), {}, 2, ["--metrics-json", "symlink", "outside"]),
        ("metrics same as out", dict(metrics="out.mp4"), {}, 2, ["--metrics-json", "same file"]),
        ("metrics is the image", dict(metrics="input.png", image="input.png"), {}, 2, ["--metrics-json", "input image"]),
        ("out is a FIFO", dict(over_out="fifo.mp4"), {}, 2, ["--out", "FIFO"]),
        ("out name too long", dict(over_out="x" * 300 + ".mp4"), {}, 2, ["--out", "longer than"]),
        ("out inside the checkpoint", dict(over={"--ckpt-dir": str(linked), "--out": str(linked / "x.mp4")}), {}, 2,
         ["--out", "inside the checkpoint"]),
        ("metrics is a file the checkpoint reads",
         dict(over={"--ckpt-dir": str(linked)}, extra=["--metrics-json", str(store / "config.json")]), {}, 2,
         ["--metrics-json", "a file the run reads"]),
        ("config num_layers 1e9", dict(over={"--ckpt-dir": str(ckpts["layers"])}), {}, 2, ["num_layers 1000000000"]),
        ("config dim 1e18", dict(over={"--ckpt-dir": str(ckpts["dim"])}), {}, 2, ["expected dim", "config.json"]),
        ("config text_len 1e9", dict(over={"--ckpt-dir": str(ckpts["textlen"])}), {}, 2, ["text_len", "limit"]),
        ("config 5000 digits", dict(over={"--ckpt-dir": str(ckpts["digits"])}), {}, 2, ["config.json", "readable"]),
        ("T5 pickle with code", dict(over={"--ckpt-dir": str(ckpts["pickle"])}), {}, 2,
         ["models_t5_umt5-xxl-enc-bf16.pth", "not a plain tensor file", "exec"]),
        ("shard is a directory", dict(over={"--ckpt-dir": str(ckpts["shard-dir"])}), {}, 2,
         ["00002-of-00007", "not a regular file"]),
        ("image bomb 20000x20000", dict(over={"--image": str(tmp / "bomb.png")}), {}, 2, ["--image", "decompression"]),
        ("NaN in the VAE", dict(over={"--ckpt-dir": str(ckpts["nanvae"])}, quiet=True), {}, 1, ["VAE decode", "NaN"]),
        ("demo cache is a file", dict(demo=["--cache-dir", str(tmp / "not-a-dir")]), {}, 2,
         ["not-a-dir", "--cache-dir", "WANENGINE_CACHE"]),
        ("demo cache cannot be created", dict(demo=[]), {"WANENGINE_CACHE": "/proc/no-such/cache"}, 2,
         ["/proc/no-such/cache", "--cache-dir"]),
        ("quiet run records the seed", dict(quiet=True, over_out=long_name, metrics="m.json", no_previous=True),
         {}, 0, ["seed"]),
    ]
    cases = []
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env_base["PYTHONPATH"] = str(REPO_ROOT)
    for name, spec, env, code, words in table:
        case_dir = tmp / "cases" / name.replace(" ", "_").replace(":", "").replace("/", "_")
        case_dir.mkdir(parents=True)
        out_name = spec.get("over_out", "out.mp4")
        if not spec.get("no_previous"):
            (case_dir / "out.mp4").write_bytes(PREVIOUS)
        os.mkfifo(case_dir / "fifo.json")
        os.mkfifo(case_dir / "fifo.mp4")
        outside = tmp / "outside"
        outside.mkdir(exist_ok=True)
        (case_dir / "link.json").symlink_to(outside / "target.json")
        if spec.get("image"):
            (case_dir / spec["image"]).write_bytes((golden / "input.png").read_bytes())
        if "demo" in spec:
            args = ["demo", "--out", str(case_dir / "out.mp4"), *spec["demo"]]
        else:
            over = dict(spec.get("over", {}))
            over.setdefault("--out", str(case_dir / out_name))
            if spec.get("image"):
                over["--image"] = str(case_dir / spec["image"])
            args = base(case_dir, **over) + list(spec.get("extra", []))
            if "metrics" in spec:
                args += ["--metrics-json", str(case_dir / spec["metrics"])]
        if spec.get("quiet"):
            args = ["--quiet"] + args
        cases.append({"name": name, "args": args, "env": {**env_base, **env}, "cwd": str(case_dir),
                      "expect": code, "words": words, "dir": str(case_dir), "out": str(case_dir / out_name)})
    return cases


def _pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def results(golden, golden_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability-cli")
    cases = _cases(tmp, golden, golden_ckpt)
    (tmp / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "_cli_zygote.py"), str(tmp / "cases.json"),
                    str(tmp / "results.json")], check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    got = {r["name"]: r for r in json.loads((tmp / "results.json").read_text())}
    print("elapsed:", {name: round(r["elapsed"], 2) for name, r in got.items()})
    return {c["name"]: (c, got[c["name"]]) for c in cases}


CASE_NAMES = ["seed too large", "seed not a number", "unknown flag", "offload maybe", "frame num 100001",
              "sample steps 1e6", "memory: golden at 4093 frames", "memory: 14B at 1280x720x81",
              "metrics is a FIFO", "metrics is a directory", "metrics symlink outside", "metrics same as out",
              "metrics is the image", "out is a FIFO", "out name too long", "out inside the checkpoint",
              "metrics is a file the checkpoint reads", "config num_layers 1e9", "config dim 1e18",
              "config text_len 1e9", "config 5000 digits", "T5 pickle with code", "shard is a directory",
              "image bomb 20000x20000", "NaN in the VAE", "demo cache is a file", "demo cache cannot be created",
              "quiet run records the seed"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_case(results, name):
    case, result = results[name]
    stderr = result["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result["code"] == case["expect"], stderr
    assert "Traceback" not in stderr + result["stdout"]
    case_dir = Path(case["dir"])
    leftovers = [p.name for p in case_dir.iterdir() if ".partial" in p.name or "-staging-" in p.name]
    assert not leftovers, leftovers
    if case["expect"] != 0:
        assert len(lines) == 1, stderr
        for word in case["words"]:
            assert word in lines[0], lines[0]
        assert "Possible options" not in lines[0] and "weights_only" not in lines[0]
        assert (case_dir / "out.mp4").read_bytes() == PREVIOUS  # the existing output is untouched
        assert sorted(p.name for p in case_dir.iterdir()) == sorted(
            ["out.mp4", "fifo.json", "fifo.mp4", "link.json"] + (["input.png"] if name == "metrics is the image" else []))
        assert (case_dir / "fifo.json").is_fifo() and (case_dir / "fifo.mp4").is_fifo()
        assert not (case_dir / "link.json").resolve().exists()  # the symlink's target was never created
    if name.startswith(("memory:", "frame num", "config ")):
        assert result["elapsed"] < 2.0, f"{name}: refused after {result['elapsed']:.2f} s"


def test_quiet_run_records_the_seed_in_stderr_metrics_and_mp4(results):
    from wanengine.io.mp4 import read_mp4_header

    case, result = results["quiet run records the seed"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"wrote {case['out']} (5 frames, seed "), result["stderr"]
    seed = int(lines[0].rsplit("seed ", 1)[1].rstrip(")"))
    frames, comment = read_mp4_header(Path(case["out"]))
    assert frames == 5 and json.loads(comment)["seed"] == seed
    metrics = json.loads((Path(case["dir"]) / "m.json").read_text())
    assert metrics["settings"]["seed"] == seed and metrics["output"] == case["out"]
    assert len(os.fsencode(Path(case["out"]).name)) == 255


def test_memory_check_accepts_what_runs_today(results):
    """The successful runs above went through the memory preflight with the real host memory."""
    assert results["quiet run records the seed"][1]["code"] == 0
    assert results["NaN in the VAE"][1]["code"] == 1  # failed at decode, i.e. after the preflight accepted it
