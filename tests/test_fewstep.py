"""Few-step sampling (spec distill.md): the flow Euler schedule and update, float timesteps,
MoE routing, guidance off as one forward per step (counted), mixed scales, the negative prompt
left unencoded, --preset distill-4step and the --cfg-size 2 refusal."""
from __future__ import annotations

from typing import List

import pytest
import torch

from wanengine.errors import ConfigError
from wanengine.pipeline import (HIGH, LOW, ForwardCount, batched_cfg, denoise, expert_for, needs_unconditional,
                                sequential_cfg)
from wanengine.schedulers import make_sampler
from wanengine.schedulers.schedule import SamplerStateError


# --------------------------------------------------------------------------- schedule and update
def test_euler_schedule_n4_shift5_is_the_spec():
    sampler = make_sampler("euler", 4, 5.0)
    assert sampler.sigmas.dtype == torch.float32 and sampler.timesteps.dtype == torch.float32
    want_sigmas = torch.tensor([1.0, 0.9375, 5 * 0.5 / (1 + 4 * 0.5), 0.625, 0.0], dtype=torch.float64)
    assert torch.equal(sampler.sigmas, want_sigmas.to(torch.float32))
    assert sampler.timesteps.tolist() == [1000.0, 937.5, float(torch.tensor(2500.0 / 3.0, dtype=torch.float32)), 625.0]
    assert [expert_for(t) for t in sampler.timesteps.tolist()] == [HIGH, HIGH, LOW, LOW]
    explicit = make_sampler("euler", None, 5.0, step_list=[1000, 750, 500, 250])
    assert torch.equal(explicit.timesteps, sampler.timesteps) and torch.equal(explicit.sigmas, sampler.sigmas)
    unshifted = make_sampler("euler", None, 1.0, step_list=[900, 450.5, 10])
    assert unshifted.sigmas.tolist() == pytest.approx([0.9, 0.4505, 0.01, 0.0], abs=1e-7)


def test_euler_update_equals_a_hand_written_loop():
    sampler = make_sampler("euler", 4, 5.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 4, 6, generator=gen)
    flows = [torch.randn(x.shape, generator=gen) for _ in range(4)]
    sig = [1.0, 0.9375, 2.5 / 3.0, 0.625, 0.0]
    sig = [float(torch.tensor(s, dtype=torch.float32)) for s in sig]
    want, got = x.clone(), x.clone()
    for i, t in enumerate(sampler.timesteps.tolist()):
        want = want + (sig[i + 1] - sig[i]) * flows[i]
        got = sampler.step(flows[i], t, got)
        assert torch.equal(got, want)
    with pytest.raises(SamplerStateError):
        sampler.step(flows[0], 1000.0, got)


@pytest.mark.parametrize("steps", ["1000,1000", "1200,500", "500,0", "", "a,b"])
def test_bad_step_lists_are_refused(steps):
    from wanengine.config import GenerationOptions

    with pytest.raises(ConfigError, match="^denoising_steps: "):
        GenerationOptions(prompt="p", solver="euler", denoising_steps=steps).validate()


def test_step_list_is_euler_only():
    with pytest.raises(ConfigError, match="only the euler sampler"):
        make_sampler("unipc", 4, 5.0, step_list=[1000, 500])


# --------------------------------------------------------------------------- the loop
class RecordingExpert:
    """A fake expert: v = 0.1 * x + row-wise context mean + 1e-3 t; records every call."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def __call__(self, x, t, context, y, seq_len):
        self.calls.append((x.shape[0], t.clone(), len(context)))
        ctx = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)
        return 0.1 * x + ctx + 1e-3 * t.view(-1, 1, 1, 1, 1) + 0.01 * (1.0 if self.name == HIGH else -1.0)


def _run(sampler, guide, guidance=batched_cfg, contexts=None):
    experts = {HIGH: RecordingExpert(HIGH), LOW: RecordingExpert(LOW)}
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(16, 1, 2, 2, generator=gen)
    y = torch.randn(20, 1, 2, 2, generator=gen)
    if contexts is None:
        contexts = (torch.full((3, 4096), 0.5), torch.full((2, 4096), -0.25))
    count = ForwardCount()
    out = denoise(get_expert=experts.__getitem__, sampler=sampler, latent=latent, y=y, contexts=contexts,
                  seq_len=1, guide_scale=guide, guidance=guidance, count=count)
    return out, experts, count, (latent, y, contexts)


@pytest.mark.parametrize("guidance", [batched_cfg, sequential_cfg], ids=["batched", "sequential"])
def test_guidance_off_runs_one_forward_per_step_equal_to_the_conditional_path(guidance):
    sampler = make_sampler("euler", 4, 5.0)
    out, experts, count, (latent, y, contexts) = _run(sampler, (1.0, 1.0), guidance, contexts=(torch.full((3, 4096), 0.5), None))
    assert count.forwards == 4
    calls = experts[HIGH].calls + experts[LOW].calls
    assert [c[0] for c in calls] == [1, 1, 1, 1] and all(c[2] == 1 for c in calls)
    assert len(experts[HIGH].calls) == 2 and len(experts[LOW].calls) == 2
    # the DiT sees the float timesteps, untruncated
    seen = [float(c[1]) for c in experts[HIGH].calls + experts[LOW].calls]
    assert seen == make_sampler("euler", 4, 5.0).timesteps.tolist() and seen[2] != int(seen[2])
    # by hand: the conditional prediction straight into the Euler update
    hand, x = make_sampler("euler", 4, 5.0), latent
    for t in hand.timesteps.tolist():
        expert = RecordingExpert(expert_for(t))
        v = expert(x[None], torch.full((1,), t, dtype=torch.float32), [contexts[0]], y[None], 1)[0]
        x = hand.step(v, t, x)
    assert torch.equal(out, x)


def test_mixed_scales_run_two_forwards_only_where_needed():
    out, experts, count, _ = _run(make_sampler("euler", 4, 5.0), (1.0, 3.5))  # (low, high)
    assert count.forwards == 2 * 2 + 2 * 1
    assert [c[0] for c in experts[HIGH].calls] == [2, 2] and [c[0] for c in experts[LOW].calls] == [1, 1]
    guided, experts, count, _ = _run(make_sampler("euler", 4, 5.0), (3.5, 3.5))
    assert count.forwards == 8 and not torch.equal(out, guided)


def test_needs_unconditional():
    euler = make_sampler("euler", 4, 5.0).timesteps.tolist()
    assert not needs_unconditional(euler, (1.0, 1.0))
    assert needs_unconditional(euler, (1.0, 3.5)) and needs_unconditional(euler, (3.5, 1.0))
    assert not needs_unconditional([1000.0, 950.0], (3.5, 1.0))  # only high-noise steps, scale 1


def test_unipc_and_dpmpp_timesteps_stay_integers_in_the_loop():
    for solver in ("unipc", "dpm++"):
        sampler = make_sampler(solver, 6, 5.0)
        _, experts, count, _ = _run(sampler, (3.5, 3.5))
        seen = [c[1] for c in experts[HIGH].calls + experts[LOW].calls]
        assert [int(t[0]) for t in seen] == sampler.timesteps.tolist()
        assert all(float(t[0]) == int(t[0]) for t in seen) and count.forwards == 12


# --------------------------------------------------------------------------- the engine and CLI
def test_engine_guidance_off_encodes_no_negative_prompt(golden, golden_ckpt, monkeypatch):
    from wanengine import Engine, EngineConfig
    from wanengine.presets import preset_values

    engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False))
    prompts: List[list] = []
    real = engine.encode_text
    monkeypatch.setattr(engine, "encode_text", lambda p: (prompts.append(list(p)), real(p))[1])
    # the latents are what this test compares: skip the VAE decode (the slow part on a CPU)
    monkeypatch.setattr(engine, "decode", lambda z: torch.empty(3, 0, 8 * z.shape[-2], 8 * z.shape[-1]))
    call = dict(image=golden / "input.png", prompt="a cat", max_area=12288, frame_num=5, seed=3)
    video = engine.i2v(**call, **preset_values("distill-4step"))
    assert prompts == [["a cat"]] and video.metadata["dit_forwards"] == 4
    assert video.metadata["settings"]["solver"] == "euler" and video.metadata["settings"]["steps"] == 4
    mixed = engine.i2v(**call, **{**preset_values("distill-4step"), "guide_scale": (1.0, 3.5)})
    assert len(prompts[1]) == 2 and mixed.metadata["dit_forwards"] == 6
    listed = engine.i2v(**call, solver="euler", shift=5.0, guide_scale=1.0, denoising_steps=[1000, 750, 500, 250])
    assert torch.equal(listed.latent, video.latent)


def test_cli_preset_and_explicit_overrides(monkeypatch):
    from wanengine import cli, run

    seen = {}
    monkeypatch.setattr(run, "preflight_run", lambda cfg, opts, *a, **kw: seen.update(opts=opts) or "plan")
    monkeypatch.setattr(run, "run_i2v", lambda plan, say: None)
    base = ["i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p"]
    for extra, want in (
            (["--preset", "distill-4step"], ("euler", 4, 5.0, (1.0, 1.0), None)),
            (["--preset", "distill-4step", "--sample-steps", "6", "--guide-scale", "1.0,2.0"],
             ("euler", 6, 5.0, (1.0, 2.0), None)),
            (["--preset", "distill-4step", "--sample_shift", "3"], ("euler", 4, 3.0, (1.0, 1.0), None)),
            (["--denoising-steps", "1000,750,500,250", "--guide-scale", "1"],
             ("euler", 4, 5.0, (1.0, 1.0), (1000.0, 750.0, 500.0, 250.0))),
            ([], ("unipc", 40, 5.0, (3.5, 3.5), None))):
        with pytest.raises(SystemExit) as info:
            cli.main(base + extra)
        assert info.value.code in (0, None)
        opts = seen["opts"]
        assert (opts.solver, opts.steps, opts.shift, opts.guidance, opts.denoising_steps) == want, extra


def test_cli_refuses_cfg_size_2_with_guidance_off_before_loading(golden, golden_ckpt, tmp_path, monkeypatch, capsys):
    from wanengine import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "x.mp4"
    with pytest.raises(SystemExit) as info:
        cli.main(["i2v", "--ckpt-dir", str(golden_ckpt), "--image", str(golden / "input.png"), "--prompt", "p",
                  "--preset", "distill-4step", "--cfg-size", "2", "--device", "cpu", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to split; use --ulysses-size" in err[0] and not out.exists()


# --------------------------------------------------------------------------- plan
def test_plan_counts_four_forwards_for_the_distilled_run():
    from wanengine.plan import format_plan, make_plan

    guided = make_plan(size="1280*720", steps=40, solver="unipc")
    distilled = make_plan(size="1280*720", steps=4, solver="euler", guide_scale=(1.0, 1.0))
    assert (guided.flops.dit_forwards, distilled.flops.dit_forwards) == (80, 4)
    assert distilled.flops.per_video == 4 * guided.flops.per_forward
    assert guided.flops.per_video / distilled.flops.per_video == 20.0
    assert distilled.flops.t5 == guided.flops.t5 / 2  # the negative prompt is not encoded
    mixed = make_plan(steps=4, solver="euler", guide_scale=(1.0, 3.5), cfg_size=2, ulysses_size=1)
    assert (mixed.flops.dit_forwards, mixed.flops.dit_forwards_per_device) == (6, 4)
    assert "4 steps, 4 forwards" in format_plan(make_plan(steps=4, solver="euler", cfg=False))


def test_plan_cli_preset(capsys):
    from wanengine import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "--preset", "distill-4step", "--hardware", "h100"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    assert "4 steps (euler), guidance off" in text and "video (4 steps, 4 forwards)" in text
    with pytest.raises(SystemExit):
        cli.main(["plan", "--preset", "distill-4step", "--guide-scale", "1.0,3.5", "--json"])
    import json

    assert json.loads(capsys.readouterr().out)["flops"]["dit_forwards"] == 6
