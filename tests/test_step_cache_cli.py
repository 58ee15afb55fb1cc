"""The step cache through the CLI: bad options are one line and exit 2 before any weight is read;
`calibrate-cache` writes a table that loads back and drives `i2v --step-cache mag`, whose
metrics and stage table report the skipped steps."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import pytest

from wanengine import cli
from wanengine.cache.table import load_table


def _main(argv: List[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0)


def _i2v_args(golden: Path, out: Path, steps: int = 2) -> List[str]:
    return ["i2v", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"), "--prompt", "a cat",
            "--max-area", "12288", "--frame-num", "5", "--sample-steps", str(steps), "--seed", "3",
            "--device", "cpu", "--dtype", "float32", "--out", str(out)]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to build an engine (load weights) fails the test."""
    from wanengine import engine

    def refuse(self, cfg):
        raise AssertionError("weights were about to be loaded")

    monkeypatch.setattr(engine.Engine, "__init__", refuse)


def _table_for(path: Path, steps: int) -> Path:
    ratios = [1.0] * steps
    path.write_text(json.dumps({"format": "wanengine-mag-cache-table", "version": 1, "steps": steps, "ratios": {
        e: {"cond": ratios, "uncond": ratios} for e in ("high_noise_model", "low_noise_model")}}))
    return path


BAD = {  # extra i2v flags -> words the one error line must contain
    "unknown policy": (["--step-cache", "teacache", "--cache-threshold", "0.1"], ["--step-cache", "teacache"]),
    "negative threshold": (["--step-cache", "first-block", "--cache-threshold", "-0.1"], ["--cache-threshold", ">= 0"]),
    "missing threshold": (["--step-cache", "first-block"], ["--cache-threshold", "required"]),
    "table for another step count": (["--step-cache", "mag", "--cache-threshold", "0.1", "--cache-table", "{table}"],
                                     ["--cache-table", "8 steps", "has 2"]),
    "not a table": (["--step-cache", "mag", "--cache-threshold", "0.1", "--cache-table", "{junk}"],
                    ["--cache-table", "not a mag-cache table"]),
    "ratio list of the wrong length": (["--step-cache", "mag", "--cache-threshold", "0.1", "--cache-table",
                                        "{short}"], ["--cache-table", "ratios.high_noise_model.cond", "2 entries"]),
    "max skips 0": (["--step-cache", "first-block", "--cache-threshold", "0.1", "--cache-max-skips", "0"],
                    ["--cache-max-skips"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_cache_options_fail_before_loading(case, golden, tmp_path, capsys, no_loading):
    flags, words = BAD[case]
    table = _table_for(tmp_path / "t8.json", 8)
    (tmp_path / "junk.json").write_text('{"steps": 2}')
    short = json.loads(_table_for(tmp_path / "t2.json", 2).read_text())
    short["ratios"]["high_noise_model"]["cond"].append(1.0)
    (tmp_path / "short.json").write_text(json.dumps(short))
    flags = [f.format(table=table, junk=tmp_path / "junk.json", short=tmp_path / "short.json") for f in flags]
    code = _main(_i2v_args(golden, tmp_path / "out.mp4") + flags)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert all(word in err[0] for word in words), err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "out.mp4").exists()


def test_bad_calibrate_output_fails_before_loading(golden, tmp_path, capsys, no_loading):
    args = ["calibrate-cache", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"),
            "--prompt", "a cat", "--out", str(tmp_path / "table.txt")]
    assert _main(args) == 2
    assert "--out" in capsys.readouterr().err
    # the output-path rules of every command (io.output_paths), not a weaker copy
    os.symlink(tmp_path / "elsewhere" / "t.json", tmp_path / "link.json")
    (tmp_path / "elsewhere").mkdir()
    assert _main([*args[:-1], str(tmp_path / "link.json")]) == 2
    assert "is a symlink to" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_then_mag_through_the_cli(golden, tmp_path, capsys):
    steps = 6  # golden schedule: 3 high-noise steps, then 3 low-noise ones
    table_path = tmp_path / "table.json"
    code = _main(["calibrate-cache", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"),
                  "--prompt", "a cat", "--max-area", "12288", "--frame-num", "5", "--sample-steps", str(steps),
                  "--seed", "3", "--device", "cpu", "--dtype", "float32", "--out", str(table_path)])
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # nothing else (no video, no partial file)
    table = load_table(table_path)
    assert table.steps == steps and table.info["experts"] == ["high_noise_model"] * 3 + ["low_noise_model"] * 3
    for branch in ("cond", "uncond"):  # a ratio wherever the expert ran the step before
        assert [r is not None for r in table.ratios["high_noise_model"][branch]] == [False, True, True] + [False] * 3
        assert [r is not None for r in table.ratios["low_noise_model"][branch]] == [False] * 4 + [True, True]
        assert all(0.5 < r < 2.0 for r in table.ratios["high_noise_model"][branch] if r is not None)

    metrics = tmp_path / "metrics.json"
    capsys.readouterr()
    code = _main(_i2v_args(golden, tmp_path / "out.safetensors", steps)
                 + ["--step-cache", "mag", "--cache-table", str(table_path), "--cache-threshold", "1.0",
                    "--metrics-json", str(metrics)])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads(metrics.read_text())["cache"]
    assert report["policy"] == "mag" and report["threshold"] == 1.0 and report["table"] == str(table_path)
    assert report["skipped_steps"] == [1, 2, 4]  # every step the rules allow at a threshold this large
    assert report["skipped_fraction"] == pytest.approx(0.5)
    assert "step cache (mag, threshold 1): 3 of 6 steps skipped (50.0%): steps 2, 3, 5" in err


def test_plan_states_the_cache_memory():
    from wanengine.plan import make_plan

    def cache_gb(**kwargs) -> float:
        rows = {row[0]: row for row in make_plan(size="1280*720", dtype="bfloat16", **kwargs).memory.rows}
        return next((row[3] for name, row in rows.items() if name.startswith("step cache")), 0.0) / 1e9

    one = 75_600 * 5120 * 2 / 1e9  # one [L, D] bf16 tensor at 720p: 0.77 GB
    assert cache_gb() == 0.0
    assert cache_gb(step_cache="mag") == pytest.approx(2 * one)  # two branches, one tensor each
    assert cache_gb(step_cache="first-block") == pytest.approx(4 * one)  # and block 0's residual
    assert cache_gb(step_cache="first-block", cfg_size=2, ulysses_size=4) == pytest.approx(2 * one / 4)
