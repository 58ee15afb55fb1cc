"""The CLI's parsing: the reference release's flag spellings give the same settings as ours."""
from __future__ import annotations

import pytest

from wanengine import cli, run


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_preflight(cfg, opts, image, out, metrics_json, **_):
        seen.update(cfg=cfg, opts=opts, image=image, out=out, metrics=metrics_json)
        return "plan"

    monkeypatch.setattr(run, "preflight_run", fake_preflight)
    monkeypatch.setattr(run, "run_i2v", lambda plan, say: None)
    return seen


def _parse(argv, captured):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code in (0, None)
    return captured["cfg"], captured["opts"], captured["out"]


NEW = ["i2v", "--ckpt-dir", "ck", "--image", "im.png", "--prompt", "a cat", "--size", "832*480", "--frame-num", "17",
       "--sample-steps", "12", "--sample-shift", "3.0", "--sample-solver", "dpm++", "--guide-scale", "4.0",
       "--seed", "7", "--out", "o.mp4", "--no-offload-model", "--t5-cpu", "--ulysses-size", "1"]
REFERENCE = ["i2v", "--task", "i2v-A14B", "--ckpt_dir", "ck", "--image", "im.png", "--prompt", "a cat", "--size",
             "832*480", "--frame_num", "17", "--sample_steps", "12", "--sample_shift", "3.0", "--sample_solver",
             "dpm++", "--sample_guide_scale", "4.0", "--base_seed", "7", "--save_file", "o.mp4",
             "--offload_model", "False", "--t5_cpu", "--ulysses_size", "1"]


def test_reference_spellings_parse_to_the_same_settings(captured):
    new = _parse(NEW, captured)
    captured.clear()
    reference = _parse(REFERENCE, captured)
    assert new == reference
    cfg, opts, out = new
    assert (cfg.ckpt_dir, cfg.offload_model, cfg.t5_cpu) == ("ck", False, True)
    assert (opts.frame_num, opts.steps, opts.shift, opts.solver, opts.guidance, opts.seed) == (17, 12, 3.0, "dpm++", (4.0, 4.0), 7)
    assert opts.resolved_max_area == 832 * 480 and str(out) == "o.mp4"


def test_offload_model_true_and_pair_guidance(captured):
    cfg, opts, _ = _parse(["i2v", "--ckpt_dir", "c", "--image", "i", "--prompt", "p", "--offload_model", "True",
                           "--guide-scale", "3.0,4.5"], captured)
    assert cfg.offload_model is True and opts.guidance == (3.0, 4.5)


def test_reference_offload_model_values():
    import typer

    from wanengine.cli_argv import normalize_argv

    group = typer.main.get_command(cli.app)
    assert normalize_argv(["i2v", "--offload_model", "false", "--t5_cpu"], group) == ["i2v", "--no-offload-model",
                                                                                     "--t5-cpu"]
    assert normalize_argv(["i2v", "--offload_model=True"], group) == ["i2v", "--offload-model"]
    assert normalize_argv(["i2v", "--offload_model"], group) == ["i2v", "--offload-model"]


def test_unknown_task_is_a_usage_error(captured, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["i2v", "--task", "t2v-A14B", "--ckpt_dir", "c", "--image", "i", "--prompt", "p"])
    assert info.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_plan_command_prints_the_spec_cost(capsys):
    import json

    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "--size", "1280*720", "--json"])
    assert info.value.code in (0, None)
    plan = json.loads(capsys.readouterr().out)
    assert plan["size"] == "1280*720"
    text = json.dumps(plan)
    assert "75600" in text  # the 720p token count


def test_plan_command_rejects_a_bad_layout(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "--ulysses-size", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--ulysses-size" in err and len(err.strip().splitlines()) == 1


def test_info_command_reads_headers_only(golden_ckpt, capsys):
    import json

    with pytest.raises(SystemExit) as info:
        cli.main(["info", "--ckpt-dir", str(golden_ckpt), "--json"])
    assert info.value.code in (0, None)
    description = json.loads(capsys.readouterr().out)
    assert description["high_noise_model"]["dtypes"] == {"bfloat16": description["high_noise_model"]["parameters"]}
    assert description["low_noise_model"]["dtypes"] == {"float32": description["low_noise_model"]["parameters"]}
    assert description["high_noise_model"]["shards"] == 7 and description["low_noise_model"]["shards"] == 12
    assert description["high_noise_model"]["config"]["num_heads"] == 2
