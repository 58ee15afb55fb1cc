"""The step cache (`wanengine.cache`) end to end on the golden checkpoint (CPU, float32, 8 steps:
3 high-noise, 5 low-noise).

- exact when off: threshold 0 (first-block, mag) gives the uncached video bit for bit;
- first-block skips exactly the steps a hand-written loop predicts from the block-0 residuals
  recorded in the cached run itself (warm-up, switch reset, last step, max skips);
- mag skips exactly what the rule gives for a hand-made table;
- one guidance branch per step (guidance off) works as well as two;
- multi-process (gloo): Ulysses 2 (+ FSDP), CFG 2 and both on 4 ranks agree on every skipped
  step and reproduce the single-process cached video, with a threshold at which each shard's
  own statistics would decide otherwise (so a missing all-reduce cannot pass).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
from safetensors.torch import load_file

from wanengine import Engine, EngineConfig
from wanengine.cache.apply import StepCache

STEPS = 8
# Sits between the accumulated block-0 distances of the two guidance branches and of the two
# sequence halves at step 3 of this case, so each shard alone would decide differently
# (asserted in `test_shard_statistics_disagree_at_the_threshold`).
THRESHOLD = 0.0601
VIDEO_MAX_ABS = 1e-5

Recorded = List[Tuple[str, torch.Tensor]]  # per step: expert, block-0 residual [B, L, D] float64


@pytest.fixture(scope="module")
def meta(golden: Path) -> dict:
    return json.loads((golden / "meta.json").read_text())["i2v"]


@pytest.fixture(scope="module")
def engine(golden: Path) -> Engine:
    """One loaded engine for every single-process case; each attaches its own cache (below).
    Offload on: on the CPU it runs the expert switcher's swap path, which the cache must survive."""
    return Engine(EngineConfig(ckpt_dir=str(golden / "ckpt"), device="cpu", dtype="float32", progress=False,
                               offload_model=True))


@contextmanager
def step_cache(engine: Engine, **fields) -> Iterator[Recorded]:
    """`engine` with the step cache of these `EngineConfig` fields attached (as `Engine` does
    for a config that asks for one); yields the block-0 residuals of every forward."""
    cfg = replace(engine.cfg, **fields).validate()
    engine.step_cache = StepCache.from_config(cfg, engine.dtype)
    engine.step_cache.attach(engine.experts.experts, engine.cache_layout())
    seen: Recorded = []
    hooks = [model.blocks[0].register_forward_hook(
        lambda module, args, out, name=name: seen.append((name, (out - args[0]).double())))
        for name, model in engine.experts.experts.items()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()
        engine.step_cache.detach()
        engine.step_cache = None


def generate(engine: Engine, golden: Path, meta: dict, steps: int = STEPS, **extra):
    return engine.i2v(golden / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                      max_area=meta["max_area"], frame_num=meta["frame_num"], steps=steps, shift=meta["shift"],
                      solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]), seed=meta["seed"], **extra)


def cached_run(engine: Engine, golden: Path, meta: dict, **fields):
    experts: List[str] = []
    with step_cache(engine, step_cache="first-block", **fields) as recorded:
        video = generate(engine, golden, meta, on_step=lambda info, latent: experts.append(info.expert))
    return video, recorded, experts


@pytest.fixture(scope="module")
def uncached(engine: Engine, golden: Path, meta: dict):
    return generate(engine, golden, meta)


@pytest.fixture(scope="module")
def cached(engine: Engine, golden: Path, meta: dict):
    return cached_run(engine, golden, meta, cache_threshold=THRESHOLD)


def write_table(path: Path, ratios: Dict[str, Dict[str, list]], steps: int = STEPS) -> str:
    path.write_text(json.dumps({"format": "wanengine-mag-cache-table", "version": 1, "steps": steps,
                                "ratios": ratios}))
    return str(path)


# --------------------------------------------------------------------------- the rules, by hand
def candidates(experts: Sequence[str], steps: int, warmup: int) -> List[bool]:
    """Steps the rules may skip at all: not the last, not within `warmup` of an expert switch."""
    out, since = [], 0
    for step, name in enumerate(experts):
        since = 0 if step == 0 or name != experts[step - 1] else since + 1
        out.append(step != steps - 1 and since >= warmup)
    return out


def predict_first_block(recorded: Recorded, threshold: float, *, warmup: int = 1, max_skips: Optional[int] = None,
                        rows: Optional[slice] = None, branches: Sequence[int] = (0, 1)) -> List[int]:
    """Skipped steps by the first-block rule, from the block-0 residuals of each step; `rows`
    and `branches` restrict the statistics to one shard."""
    experts = [name for name, _ in recorded]
    allowed = candidates(experts, len(recorded), warmup)
    rows = rows or slice(None)
    skipped: List[int] = []
    reference, accumulated, consecutive = None, {}, 0
    for step, (name, block0) in enumerate(recorded):
        if step == 0 or name != experts[step - 1]:
            reference = None  # reset at the expert switch
        skip = False
        if allowed[step] and reference is not None and (max_skips is None or consecutive < max_skips):
            totals = {b: accumulated[b] + float((block0[b, rows] - reference[b, rows]).abs().mean()
                                                / reference[b, rows].abs().mean()) for b in branches}
            skip = all(total < threshold for total in totals.values())
        if skip:
            accumulated, consecutive = totals, consecutive + 1
            skipped.append(step)
        else:
            reference, accumulated, consecutive = block0, {b: 0.0 for b in branches}, 0
    return skipped


def predict_mag(ratios: Dict[str, Dict[str, list]], experts: Sequence[str], threshold: float,
                branches: Sequence[str] = ("cond", "uncond")) -> List[int]:
    allowed = candidates(experts, len(experts), 1)
    skipped: List[int] = []
    product = {b: 1.0 for b in branches}
    error = {b: 0.0 for b in branches}
    for step, name in enumerate(experts):
        if step == 0 or name != experts[step - 1]:
            product, error = {b: 1.0 for b in branches}, {b: 0.0 for b in branches}
        table = [ratios[name][b][step] for b in branches]
        skip = False
        if allowed[step] and all(r is not None for r in table):
            new_product = {b: product[b] * r for b, r in zip(branches, table)}
            new_error = {b: error[b] + abs(1 - new_product[b]) for b in branches}
            skip = all(e < threshold for e in new_error.values())
        if skip:
            product, error = new_product, new_error
            skipped.append(step)
        else:
            product, error = {b: 1.0 for b in branches}, {b: 0.0 for b in branches}
    return skipped


# --------------------------------------------------------------------------- single process
@pytest.mark.slow
def test_threshold_zero_is_bit_identical_to_no_cache(engine, golden, meta, uncached, tmp_path):
    assert "cache" not in uncached.metadata  # off: no cache at all
    with step_cache(engine, step_cache="first-block", cache_threshold=0.0):
        first = generate(engine, golden, meta)
    ones = [1.0] * STEPS
    table = write_table(tmp_path / "ones.json", {e: {"cond": ones, "uncond": ones}
                                                 for e in ("high_noise_model", "low_noise_model")})
    with step_cache(engine, step_cache="mag", cache_threshold=0.0, cache_table=table):
        mag = generate(engine, golden, meta)
    again = generate(engine, golden, meta)  # detached again: the model as it was
    assert torch.equal(again.tensor, uncached.tensor)
    for video in (first, mag):
        assert torch.equal(video.tensor, uncached.tensor) and torch.equal(video.latent, uncached.latent)
        assert video.metadata["cache"]["skipped_steps"] == [] and video.metadata["cache"]["skipped_fraction"] == 0.0


@pytest.mark.slow
def test_first_block_skips_what_the_rule_predicts(cached, uncached):
    video, recorded, experts = cached
    assert len(recorded) == STEPS  # one forward (both branches) per step
    skipped = video.metadata["cache"]["skipped_steps"]
    assert skipped == predict_first_block(recorded, THRESHOLD)
    allowed = candidates(experts, STEPS, 1)
    assert skipped and any(allowed[s] and s not in skipped for s in range(STEPS))  # both outcomes occur
    assert all(allowed[s] for s in skipped)  # never a warm-up step after a switch, nor the last
    assert video.metadata["cache"]["skipped_fraction"] == pytest.approx(len(skipped) / STEPS, abs=1e-6)
    assert not torch.equal(video.tensor, uncached.tensor)


@pytest.mark.slow
def test_warmup_and_consecutive_limit(engine, golden, meta):
    video, recorded, experts = cached_run(engine, golden, meta, cache_threshold=10.0, cache_warmup=2,
                                          cache_max_skips=1)
    skipped = video.metadata["cache"]["skipped_steps"]
    assert skipped == predict_first_block(recorded, 10.0, warmup=2, max_skips=1)
    switch = experts.index("low_noise_model")
    assert not {0, 1, switch, switch + 1, STEPS - 1} & set(skipped)
    assert all(b - a > 1 for a, b in zip(skipped, skipped[1:]))  # never two in a row
    assert len(skipped) >= 2


@pytest.mark.slow
def test_mag_skips_what_the_rule_gives_for_a_hand_made_table(engine, golden, meta, uncached, tmp_path):
    experts = meta["experts"] + ["low_noise_model"] * (STEPS - len(meta["experts"]))
    high = [None, 0.99, 0.97] + [None] * (STEPS - 3)
    low_cond = [None] * 4 + [0.99, 0.95, 0.99, 0.99]
    low_uncond = [None] * 4 + [0.99, 0.99, 0.90, 0.99]  # step 6: only this branch says no
    ratios = {"high_noise_model": {"cond": high, "uncond": high},
              "low_noise_model": {"cond": low_cond, "uncond": low_uncond}}
    table = write_table(tmp_path / "table.json", ratios)
    seen: List[str] = []
    with step_cache(engine, step_cache="mag", cache_threshold=0.05, cache_table=table):
        video = generate(engine, golden, meta, on_step=lambda info, latent: seen.append(info.expert))
    assert seen == experts
    want = predict_mag(ratios, experts, 0.05)
    assert video.metadata["cache"]["skipped_steps"] == want
    assert want and want != predict_mag(ratios, experts, 0.05, branches=("cond",))  # the branches' states count
    assert not torch.equal(video.tensor, uncached.tensor)


@pytest.mark.slow
def test_one_branch_per_step(engine, golden, meta):
    """A guidance that runs only the conditional branch (one sample per forward) is cached too."""

    def cond_only(expert, latent, t, contexts, y, seq_len, scale):
        return expert(latent[None], torch.full((1,), t, dtype=torch.float32), [contexts[0]], y[None], seq_len)[0]

    engine.guidance = lambda: cond_only  # this instance only
    try:
        with step_cache(engine, step_cache="first-block", cache_threshold=THRESHOLD) as recorded:
            video = generate(engine, golden, meta)
    finally:
        del engine.guidance
    assert all(r0.shape[0] == 1 for _, r0 in recorded)
    skipped = video.metadata["cache"]["skipped_steps"]
    assert skipped and skipped == predict_first_block(recorded, THRESHOLD, branches=(0,))


def test_decisions_are_agreed_among_the_ranks_that_compute_the_step():
    """CFG parallel: over every rank, except for a conditional-only (guidance off) expert, whose
    steps only CFG group 0 computes -- then within its Ulysses group, or not at all."""
    from wanengine.cache.options import CacheSettings
    from wanengine.cache.state import CacheLayout, CacheRun

    layout = CacheLayout(sp_rank=1, sp_size=2, cfg_rank=0, cfg_size=2, world_group="world", sp_group="sp",
                         distributed=True)

    def run_for(layout: CacheLayout) -> CacheRun:
        return CacheRun(CacheSettings("first-block", 0.1), None, layout, 4, torch.float32, lambda run: None,
                        cond_only={"low_noise_model"})

    run = run_for(layout)
    run.begin_step("high_noise_model")
    assert run.decision_group() == (True, "world") and run.all_slots(1) == [0, 1] and run.slots_for(1) == [0]
    run.begin_step("low_noise_model")
    assert run.decision_group() == (True, "sp") and run.all_slots(1) == [0] and run.slots_for(1) == [0]
    alone = run_for(replace(layout, sp_size=1, sp_rank=0, sp_group=None))
    alone.begin_step("low_noise_model")
    assert alone.decision_group() == (False, None)
    other = run_for(replace(layout, cfg_rank=1))
    other.begin_step("low_noise_model")
    with pytest.raises(RuntimeError, match="conditional branch only"):
        other.slots_for(1)
    assert run_for(CacheLayout()).decision_group() == (False, None)  # one process: no collective


# --------------------------------------------------------------------------- multi-process
SHARDS = {  # layout -> each rank's (sequence rows of 2 chunks, guidance branches)
    "ulysses2_dit_fsdp": [(0, (0, 1)), (1, (0, 1))],
    "cfg2": [(None, (0,)), (None, (1,))],
    "cfg2_x_ulysses2": [(0, (0,)), (1, (0,)), (0, (1,)), (1, (1,))],
}
LAUNCHES = {"2 ranks: ulysses2 + dit-fsdp, then cfg2": (2, "ulysses2_dit_fsdp,cfg2"),
            "4 ranks: cfg2 x ulysses2": (4, "cfg2_x_ulysses2")}


def _rows(chunk: Optional[int], tokens: int) -> slice:
    if chunk is None:
        return slice(None)
    size = math.ceil(tokens / 2)
    return slice(chunk * size, min((chunk + 1) * size, tokens))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(SHARDS))
def test_shard_statistics_disagree_at_the_threshold(cached, layout):
    """Precondition of the multi-process test: some rank's own statistics would skip other steps."""
    video, recorded, _ = cached
    tokens = recorded[0][1].shape[1]
    whole = predict_first_block(recorded, THRESHOLD)
    assert whole == video.metadata["cache"]["skipped_steps"]
    local = [predict_first_block(recorded, THRESHOLD, rows=_rows(chunk, tokens), branches=branches)
             for chunk, branches in SHARDS[layout]]
    assert any(decisions != whole for decisions in local), local


@pytest.mark.slow
@pytest.mark.parametrize("launch_case", sorted(LAUNCHES))
def test_parallel_layouts_agree_with_the_single_process_cache(cached, tmp_path, launch_case):
    from _parallel_worker import launch

    world, layouts = LAUNCHES[launch_case]
    video, _, _ = cached
    want = video.metadata["cache"]["skipped_steps"]
    reports = launch(world, "cache", tmp_path, ["--layouts", layouts, "--cache-threshold", str(THRESHOLD),
                                                "--steps", str(STEPS)], timeout=300)
    for layout in layouts.split(","):
        assert [r[layout]["skipped_steps"] for r in reports] == [want] * world, layout
        got = load_file(str(tmp_path / f"video_{layout}.safetensors"))["video"]
        assert float((got - video.tensor).abs().max()) <= VIDEO_MAX_ABS, layout
