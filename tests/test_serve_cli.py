"""`wanengine serve` options: `--help` documents every one, and a bad option or setup is one
line and exit 2 before any weight is read (no server started)."""
from __future__ import annotations

import importlib.util

import pytest

from wanengine import cli
from wanengine.serve import server

OPTIONS = ["--ckpt-dir", "--device", "--dtype", "--kernel-backend", "--offload-model", "--t5-cpu", "--vae-tile-rows",
           "--ulysses-size", "--cfg-size", "--dit-fsdp", "--t5-fsdp", "--vae-parallel", "--host", "--port",
           "--output-dir", "--max-queue", "--max-upload-mb", "--api-key", "--job-ttl", "--high-noise-model",
           "--low-noise-model", "--t5", "--vae", "--tokenizer", "--dit-config", "--quantize", "--quantize-t5",
           "--lora", "--lora-high", "--lora-low", "--step-cache", "--cache-threshold", "--cache-warmup",
           "--cache-max-skips", "--cache-table"]


def run(argv, capsys) -> tuple:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_help_documents_every_option(capsys):
    code, out, _ = run(["serve", "--help"], capsys)
    assert code in (0, None)
    for option in OPTIONS:
        assert option in out, option
    assert "WANENGINE_API_KEY" in out and "127.0.0.1" in out


@pytest.fixture
def no_engine(monkeypatch):
    """Fail loudly if a refused setup got as far as loading the engine."""
    def refuse(cfg):
        raise AssertionError("the engine was loaded")

    monkeypatch.setattr(server, "load_engine", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--max-queue", "0"], "--max-queue: must be >= 1"),
    (["--port", "70000"], "--port: 70000 is not a port number"),
    (["--job-ttl", "-1"], "--job-ttl: must be >= 0"),
    (["--max-upload-mb", "0"], "--max-upload-mb: must be positive"),
    (["--output-dir", "/nonexistent-parent/jobs"], "--output-dir: /nonexistent-parent/jobs: directory"),
    (["--ulysses-size", "2"], "multi-card runs need torchrun"),
    (["--dtype", "float8"], "--dtype: 'float8' is not one of"),
    (["--step-cache", "sometimes"], "--step-cache"),
    (["--step-cache", "first-block", "--cache-threshold", "-1"], "--cache-threshold"),
    (["--lora-high", "/nonexistent/adapter.safetensors"], "/nonexistent/adapter.safetensors"),
])
def test_bad_setup_is_one_line_and_exit_2(golden_ckpt, tmp_path, capsys, no_engine, extra, message):
    code, _, err = run(["serve", "--ckpt-dir", str(golden_ckpt), "--output-dir", str(tmp_path / "jobs"), *extra],
                       capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_checkpoint_and_missing_extra(tmp_path, capsys, no_engine, monkeypatch):
    code, _, err = run(["serve", "--ckpt-dir", str(tmp_path / "nothing")], capsys)
    assert code == 2 and str(tmp_path / "nothing") in err and len(err.strip().splitlines()) == 1
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, _, err = run(["serve", "--ckpt-dir", str(tmp_path)], capsys)
    assert code == 2 and "needs the [serve] extra (uvicorn missing)" in err


def test_a_taken_port_is_refused_before_loading(golden_ckpt, tmp_path, capsys, no_engine):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["serve", "--ckpt-dir", str(golden_ckpt), "--output-dir", str(tmp_path), "--port",
                            str(port)], capsys)
    assert code == 2 and f"--port {port}: cannot listen there" in err
