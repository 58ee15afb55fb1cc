"""First use of the CLI: the official generate.py command lines parse unchanged, global options
work after the command, flags of other tasks are one clear line, --help fits 80 columns with
every flag whole, `plan` takes any i2v command line, and parsing and usage errors happen
before torch is imported. Multi-rank jobs print an error once."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from wanengine import cli, run

PROMPT = ("Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred "
          "feline gazes directly at the camera with a relaxed expression.")
# The reference README's I2V-A14B commands, and the Ascend port's run.sh style (one flag a line there).
SINGLE_GPU = ("python generate.py --task i2v-A14B --size 1280*720 --ckpt_dir ./Wan2.2-I2V-A14B --offload_model True "
              f"--convert_model_dtype --image examples/i2v_input.JPG --prompt {shlex.quote(PROMPT)}")
MULTI_GPU = ("torchrun --nproc_per_node=8 generate.py --task i2v-A14B --size 1280*720 --ckpt_dir ./Wan2.2-I2V-A14B "
             f"--image examples/i2v_input.JPG --dit_fsdp --t5_fsdp --ulysses_size 8 --prompt {shlex.quote(PROMPT)}")
ASCEND_RUN_SH = ("torchrun --nproc_per_node=8 --master_port=23459 generate.py --task i2v-A14B "
                 "--ckpt_dir ${model_base} --size 1280*720 --frame_num 81 --sample_steps 40 --sample_shift 5.0 "
                 "--sample_solver unipc --sample_guide_scale 3.5 --dit_fsdp --t5_fsdp --cfg_size 2 --ulysses_size 4 "
                 "--vae_parallel --image examples/i2v_input.JPG --base_seed 0 --save_file out.mp4 "
                 f"--prompt {shlex.quote(PROMPT)}")


def as_i2v(command: str):
    words = shlex.split(command)
    return ["i2v", *words[words.index("generate.py") + 1:]]


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_preflight(cfg, opts, image, out, metrics_json, **_):
        seen.update(cfg=cfg, opts=opts, image=image, out=out)
        return "plan"

    monkeypatch.setattr(run, "preflight_run", fake_preflight)
    monkeypatch.setattr(run, "run_i2v", lambda plan, say: None)
    monkeypatch.setattr(cli._State, "verbosity", 1)
    monkeypatch.setattr(cli._State, "debug", False)
    return seen


def _main(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code or 0


def test_official_single_gpu_command(captured):
    assert _main(as_i2v(SINGLE_GPU)) == 0
    cfg, opts = captured["cfg"], captured["opts"]
    assert cfg.ckpt_dir == "Wan2.2-I2V-A14B" and cfg.offload_model is True and cfg.dtype == "bfloat16"
    assert opts.prompt == PROMPT and opts.resolved_max_area == 1280 * 720 and str(captured["image"]).endswith(".JPG")


def test_official_multi_gpu_and_ascend_commands(captured):
    assert _main(as_i2v(MULTI_GPU)) == 0
    cfg = captured["cfg"]
    assert (cfg.dit_fsdp, cfg.t5_fsdp, cfg.ulysses_size, cfg.cfg_size, cfg.world_size) == (True, True, 8, 1, 8)
    assert _main(as_i2v(ASCEND_RUN_SH)) == 0
    cfg, opts = captured["cfg"], captured["opts"]
    assert (cfg.cfg_size, cfg.ulysses_size, cfg.vae_parallel, cfg.ckpt_dir) == (2, 4, True, "${model_base}")
    assert (opts.frame_num, opts.steps, opts.shift, opts.seed, opts.guidance) == (81, 40, 5.0, 0, (3.5, 3.5))
    assert str(captured["out"]) == "out.mp4"


def test_convert_model_dtype_is_bfloat16_and_conflicts_with_another_dtype(captured, capsys):
    base = ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p"]
    assert _main(base + ["--convert_model_dtype"]) == 0 and captured["cfg"].dtype == "bfloat16"
    assert _main(base + ["--dtype", "float32"]) == 0 and captured["cfg"].dtype == "float32"
    capsys.readouterr()
    assert _main(base + ["--convert_model_dtype", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--convert_model_dtype" in err[0] and "--dtype" in err[0]


def test_global_options_after_the_command(captured):
    base = ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p"]
    assert _main(base + ["-q"]) == 0 and cli._State.verbosity == 0 and captured["cfg"].progress is False
    assert _main(base + ["--verbose"]) == 0 and cli._State.verbosity == 2
    assert _main(["--quiet", *base]) == 0 and cli._State.verbosity == 0
    assert _main(base + ["--debug"]) == 0 and cli._State.debug
    assert _main(["i2v", "--prompt", "-q", "--ckpt-dir", "c", "--image", "i"]) == 0  # a value, not a flag
    assert captured["opts"].prompt == "-q" and cli._State.verbosity == 1


@pytest.mark.parametrize("argv, words", [
    (["--audio", "talk.wav"], ["--audio", "not supported by this engine", "s2v"]),
    (["--use_prompt_extend"], ["--use_prompt_extend", "not supported by this engine"]),
    (["--src_root_path", "x"], ["--src_root_path", "animate"]),
    (["--task", "t2v-A14B"], ["--task t2v-A14B", "not supported by this engine"]),
    (["--no-such-flag"], ["no such option: --no-such-flag", "wanengine i2v --help"]),
])
def test_other_tasks_flags_are_one_line(captured, capsys, argv, words):
    assert _main(["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines[0]
    assert "cfg" not in captured


def test_errors_print_once_in_a_multi_rank_job(captured, capsys, monkeypatch):
    bad = ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p", "--frame-num", "80"]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WANENGINE_RANK_ERROR_GRACE_S", "0")  # no wait for rank 0 (tests/test_rank_errors.py)
    assert _main(bad) == 2 and capsys.readouterr().err == ""  # quiet, same exit code
    assert _main(bad + ["-v"]) == 2 and "rank 3" in capsys.readouterr().err  # shown when asked for
    monkeypatch.setenv("RANK", "0")
    assert _main(bad) == 2
    assert capsys.readouterr().err.strip() == "wanengine: error: --frame-num: 80 is not of the form 4n+1 " \
                                              "(e.g. 81, 49, 17, 5, 1)"


def test_plan_accepts_an_i2v_command_line(golden, capsys):
    words = as_i2v(SINGLE_GPU)[1:]
    words[words.index("--image") + 1] = str(golden / "input.png")  # plan reads only its aspect ratio
    assert _main(["plan", *words, "--base_seed", "3", "--sample_shift", "3.0", "--out", "x.mp4", "--t5_cpu",
                  "--hardware", "h200", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    from PIL import Image

    with Image.open(golden / "input.png") as image:
        aspect = image.height / image.width
    assert plan["offload"] is True and plan["t5_cpu"] is True and plan["dtype"] == "bfloat16"
    assert abs(plan["geometry"]["height"] / plan["geometry"]["width"] - aspect) < 0.05
    assert plan["efficiency"] == 0.61 and "docs/performance.md" in plan["efficiency_source"]
    assert _main(["plan", *as_i2v(MULTI_GPU)[1:], "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world_size"], plan["dit_fsdp"], plan["offload"]) == (8, True, False)


_SCRIPT = r"""
import contextlib, io, json, sys
from wanengine import cli
result = {}
for name, argv in (("main", ["--help"]), ("i2v", ["i2v", "--help"]), ("plan", ["plan", "--help"]),
                   ("demo", ["demo", "--help"]), ("info", ["info", "--help"]), ("convert", ["convert", "--help"]),
                   ("version", ["--version"]),
                   ("bad_flag", ["i2v", "--bogus"]),
                   ("bad_value", ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p", "--frame-num", "8"])):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code or 0
    result[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def no_torch_run():
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_and_usage_errors_come_before_torch(no_torch_run):
    """Measured in-process: after --help, --version and usage errors torch is still not imported."""
    for name, result in no_torch_run.items():
        assert result["torch"] is False, name
    from wanengine import __version__

    version = no_torch_run["version"]["out"].strip()
    assert version.startswith(f"wanengine {__version__} (python ") and "torch " in version
    for name in ("bad_flag", "bad_value"):
        assert no_torch_run[name]["code"] == 2 and len(no_torch_run[name]["err"].strip().splitlines()) == 1
    assert "--frame-num" in no_torch_run["bad_value"]["err"]


def test_help_fits_80_columns_with_every_flag_whole(no_torch_run):
    import typer

    group = typer.main.get_command(cli.app)
    for name in ("main", "i2v", "plan", "demo", "info", "convert"):
        text = no_torch_run[name]["out"]
        assert max(map(len, text.splitlines())) <= 80, name
        assert "<bool>" not in text, name
        params = group.params if name == "main" else group.commands[name].params
        for param in params:
            if getattr(param, "hidden", False):  # accepted, but no row in any panel
                for spelling in param.opts:
                    assert not re.search(rf"│\s*\*?\s*{re.escape(spelling)}\b", text), spelling
                continue
            for spelling in (*param.opts, *param.secondary_opts):
                assert spelling in text, (name, spelling)
    i2v = no_torch_run["i2v"]["out"]
    for panel in ("Inputs", "Sampling", "Performance / memory", "Parallel (torchrun)", "Output"):
        assert panel in i2v
    assert "--ckpt_dir" not in i2v.split("reference's spellings")[0]  # aliases only in the closing note
    assert "[default: 40]" in i2v and "bfloat16" in i2v
