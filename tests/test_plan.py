"""`wanengine plan` cost model: the spec's cost table, parameter counts from dims (checked
against the golden checkpoint's real tensor shapes), per-device splits, memory, time, and the
errors and warnings for invalid or wasteful layouts. Pure arithmetic: the whole file runs in ~1 s."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from wanengine.constants import constants
from wanengine.errors import ConfigError
from wanengine.param_counts import count_dit_float32_params
from wanengine.plan import (DEVICE_PRESETS, GB, block_flops, count_dit_params, count_t5_params, count_vae_params,
                            format_plan, forward_flops, make_plan)

DIT = constants()["i2v_a14b_dit"]
D, FFN = DIT["dim"], DIT["ffn_dim"]


def bf16_expert_bytes() -> int:
    """One expert as the loader holds it in bf16: 2 bytes a parameter, 4 for the float32-kept ones."""
    return count_dit_params(**DIT)[0] * 2 + count_dit_float32_params(**DIT)[0] * 2


def close(value: float, expected: float, rel: float = 0.01) -> bool:
    return abs(value - expected) <= rel * abs(expected)


# --------------------------------------------------------------------------- the spec's cost table
@pytest.mark.parametrize("tokens, linear_t, attention_t, forward_p, video_p, attention_share", [
    (32_760, 19.6, 22.0, 1.66, 133, 0.53),   # 832x480x81 (the table's 60 x 104 latent)
    (75_600, 45.2, 117, 6.5, 522, 0.72),     # 1280x720x81
])
def test_spec_cost_table(tokens, linear_t, attention_t, forward_p, video_p, attention_share):
    linear, attention = block_flops(tokens, tokens, D, FFN)
    assert close(linear, linear_t * 1e12) and close(attention, attention_t * 1e12)
    assert abs(attention / (linear + attention) - attention_share) < 0.01
    assert close(forward_flops(tokens), forward_p * 1e15)
    assert close(80 * forward_flops(tokens), video_p * 1e15)  # 40 steps x 2 CFG branches


def test_plan_720p_matches_hand_computation():
    plan = make_plan(size="1280*720", frame_num=81, steps=40, cfg=True)
    g, f = plan.geometry, plan.flops
    assert (g.width, g.height, g.latent, g.tokens, g.seq_len) == (1280, 720, (16, 21, 90, 160), 75_600, 75_600)
    L = 21 * 45 * 80
    exact_forward = 40 * (12 * L * D * D + 4 * L * D * FFN + 4 * L * L * D)
    assert f.per_forward == exact_forward
    assert f.forwards_per_step == 2 and f.per_step == 2 * exact_forward
    assert f.per_video == 80 * exact_forward
    assert close(f.per_video, 522e15) and close(f.per_forward, 6.5e15)
    # guidance off: one forward per step; fewer steps scale linearly
    assert make_plan(cfg=False).flops.per_video == 40 * exact_forward
    assert make_plan(steps=20).flops.per_video == 40 * exact_forward


def test_832x480_follows_the_reference_sizing_rule():
    # An exactly 832x480 image gives 58 latent rows (float64 floor; see test_config) -> 31,668 tokens.
    plan = make_plan(size="832*480")
    assert (plan.geometry.width, plan.geometry.height, plan.geometry.tokens) == (832, 464, 21 * 29 * 52)
    assert any("832x464" in w for w in plan.warnings)
    # The spec table's 60 x 104 latent (32,760 tokens): a max area one pixel larger lands on it.
    table = make_plan(size="832*480", max_area=399_361)
    assert table.geometry.tokens == 32_760 and close(table.flops.per_video, 133e15)


def test_image_aspect_follows_the_image():
    portrait = make_plan(size="1280*720", image_aspect=16 / 9)
    assert (portrait.geometry.width, portrait.geometry.height) == (720, 1280)
    assert portrait.geometry.tokens == 75_600


# --------------------------------------------------------------------------- parameters and weights
def test_parameter_counts_of_the_full_size_models():
    total, block = count_dit_params(**DIT)
    assert close(total, 14.3e9)
    assert block == 6 * D + 2 * (4 * (D * D + D) + 2 * D) + 2 * D + (D * FFN + FFN) + (FFN * D + D)
    assert close(total * 2, 28.6e9)  # bf16 bytes per expert
    assert close(count_t5_params(**constants()["umt5_xxl_encoder"]), 5.7e9)
    assert close(count_vae_params(**constants()["wan21_vae"]), 127e6)  # the released float32 file is ~508 MB
    plan = make_plan()
    assert plan.dit_params_per_expert == total


def test_float32_kept_parameter_counts_match_the_model():
    """The tensors the DiT loader keeps in float32 (FLOAT32_PARAMS), counted from the dims, equal
    those of the model built on the meta device: plan's bf16 expert is 28.95 GB, not 2 x params."""
    from wanengine.models.dit import DiTConfig, WanDiT
    from wanengine.models.dit_loading import FLOAT32_PARAMS

    with torch.device("meta"):
        model = WanDiT(DiTConfig(**{k: DIT[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim",
                                                        "num_heads", "num_layers", "text_len", "eps")}))
    kept = [(n, p.numel()) for n, p in model.named_parameters() if any(k in n for k in FLOAT32_PARAMS)]
    total, block = count_dit_float32_params(**DIT)
    assert total == sum(numel for _, numel in kept)
    assert block == sum(numel for name, numel in kept if name.startswith("blocks.0."))
    assert make_plan().dit_bytes_per_expert == bf16_expert_bytes() and close(bf16_expert_bytes(), 28.95e9, 1e-3)


def _numel_safetensors(paths) -> int:
    from safetensors import safe_open
    count = 0
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            count += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return count


def _numel_pth(path) -> int:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return sum(t.numel() for t in state.values())


def test_parameter_counts_match_the_golden_checkpoint(golden, golden_ckpt):
    meta = json.loads((golden / "meta.json").read_text())
    dit = dict(meta["dit"])
    for expert in ("high_noise_model", "low_noise_model"):
        shards = sorted((golden_ckpt / expert).glob("*.safetensors"))
        assert _numel_safetensors(shards) == count_dit_params(**dit)[0]
    t5 = dict(meta["t5"], num_layers=meta["t5"]["encoder_layers"])
    assert _numel_pth(golden_ckpt / "models_t5_umt5-xxl-enc-bf16.pth") == count_t5_params(**t5)
    vae = dict(meta["vae"], temporal_downsample=meta["vae"]["temperal_downsample"])
    assert _numel_pth(golden_ckpt / "Wan2.1_VAE.pth") == count_vae_params(**vae)


# --------------------------------------------------------------------------- per-device splits
def test_ulysses_and_cfg_parallel_divide_the_work():
    single = make_plan()
    ulysses = make_plan(ulysses_size=4)
    assert ulysses.geometry.tokens_per_rank == 75_600 // 4
    assert ulysses.flops.per_device_forward == single.flops.per_forward / 4
    assert ulysses.flops.per_device_video == single.flops.per_video / 4
    cfg = make_plan(cfg_size=2)
    assert cfg.flops.forwards_per_device_step == 1 and cfg.flops.per_device_video == single.flops.per_video / 2
    both = make_plan(cfg_size=2, ulysses_size=4)
    assert both.world_size == 8 and both.flops.per_device_video == single.flops.per_video / 8
    assert single.flops.per_video == both.flops.per_video  # the whole job does not change


def test_ulysses_padding_is_counted_and_reported():
    plan = make_plan(size="832*480", ulysses_size=8)  # L = 31,668 = 8 * 3958 + 4
    g = plan.geometry
    assert g.seq_len == math.ceil(g.tokens / 8) * 8 == 31_672 and g.tokens_per_rank == 3959
    linear, attention = block_flops(g.seq_len, g.tokens, D, FFN)
    assert plan.flops.per_device_forward == 40 * (linear + attention) / 8
    assert plan.flops.per_device_forward > plan.flops.per_forward / 8
    assert any("padded by 4 tokens" in w for w in plan.warnings)


def _row(plan, prefix):
    return next(row for row in plan.memory.rows if row[0].startswith(prefix))


def test_memory_weights_by_offload_fsdp_and_t5_placement():
    expert = bf16_expert_bytes()
    t5 = count_t5_params(**constants()["umt5_xxl_encoder"]) * 2
    one = make_plan(offload=True)
    assert _row(one, "DiT weights")[3] == expert and _row(one, "DiT weights")[1] == 0  # host outside the loop
    assert _row(one, "T5 weights")[1:] == (t5, 0, 0, 0)
    both = make_plan(offload=False)
    assert _row(both, "DiT weights")[1:] == (2 * expert,) * 4
    assert _row(both, "T5 weights")[1:] == (t5,) * 4
    fsdp = make_plan(ulysses_size=8, dit_fsdp=True, t5_fsdp=True)
    assert not fsdp.offload  # the engine's default for several devices
    assert _row(fsdp, "DiT weights")[3] == 2 * expert / 8
    assert _row(fsdp, "T5 weights")[1] == t5 / 8
    assert _row(fsdp, "DiT FSDP gather")[3] == 2 * (count_dit_params(**DIT)[1] + 6 * D) * 2  # modulation float32
    assert not any(row[0].startswith("T5") for row in make_plan(t5_cpu=True).memory.rows)  # all on the host
    assert _row(make_plan(dtype="float32"), "DiT weights")[3] == count_dit_params(**DIT)[0] * 4


def test_memory_activations_and_vae_split():
    single, sp4 = make_plan(cfg=False), make_plan(cfg=False, ulysses_size=4)
    act1, act4 = _row(single, "DiT activations")[3], _row(sp4, "DiT activations")[3]
    assert 3.5 < act1 / GB < 10  # a few [75600, 5120] tensors of 0.77 GB (bf16) / 1.55 GB (fp32)
    assert act4 < act1 / 3
    batched = _row(make_plan(cfg=True, cfg_batch=True), "DiT activations")[3]
    assert close(batched, 2 * act1, 0.02)
    decode = _row(single, "VAE decode working set")[4]
    unit = 96 * 4 * 720 * 1280 * 4  # one [96, 4, h, w] float32 tensor, 1.4 GB
    assert 5 * unit < decode < 15 * unit
    video = 3 * 81 * 720 * 1280 * 4
    split = _row(make_plan(ulysses_size=4, vae_parallel=True), "VAE decode working set")[4]
    assert split - video == pytest.approx((decode - video) / 4)
    assert single.memory.peak == max(single.memory.phases)


# --------------------------------------------------------------------------- time
def test_time_is_flop_over_peak_times_efficiency():
    plan = make_plan(device="cpu", device_peak_tflops=2.0, efficiency=0.5)
    t = plan.timing
    assert t.compute_per_step_s == pytest.approx(plan.flops.per_device_step / 1e12)
    assert t.ulysses_comm_per_step_s is None and t.per_step_s == t.compute_per_step_s
    assert t.denoise_s == pytest.approx(40 * t.per_step_s)
    assert t.vae_decode_s is None  # no float32 rate given for a custom device
    assert make_plan(device="cpu").timing is None


def test_ulysses_all_to_all_estimate():
    plan = make_plan(device="h100", cfg_size=2, ulysses_size=4, dit_fsdp=True, link_gbps=100.0)
    expected = 4 * 40 * 18_900 * D * 2 * 3 / 4 * 1 / 100e9  # one forward per device per step
    assert plan.timing.ulysses_comm_per_step_s == pytest.approx(expected)
    assert plan.timing.per_step_s == pytest.approx(plan.timing.compute_per_step_s + expected
                                                   + plan.timing.cfg_comm_per_step_s)


def test_device_presets():
    assert DEVICE_PRESETS["h100"].peak_tflops == 989 and DEVICE_PRESETS["h100"].memory_gb == 80
    assert DEVICE_PRESETS["h200"].peak_tflops == 989 and DEVICE_PRESETS["h200"].memory_gb == 141
    assert DEVICE_PRESETS["ascend-a2"].memory_gb == 64
    plan = make_plan(device="ascend-a2", cfg_size=2, ulysses_size=4, dit_fsdp=True, t5_fsdp=True)
    assert plan.memory.capacity == 64 * GB and plan.timing.per_video_s > 0
    assert make_plan(device="H100", device_peak_tflops=500).peak_tflops == 500  # explicit beats preset


# --------------------------------------------------------------------------- errors and warnings
@pytest.mark.parametrize("kwargs, flag", [
    (dict(world_size=4, cfg_size=2, ulysses_size=1), "--world-size"),
    (dict(ulysses_size=3), "--ulysses-size"),
    (dict(ulysses_size=0), "--ulysses-size"),
    (dict(cfg_size=3), "--cfg-size"),
    (dict(frame_num=80), "--frame-num"),
    (dict(steps=0), "--sample-steps"),
    (dict(solver="heun"), "--sample-solver"),
    (dict(dtype="int8"), "--dtype"),
    (dict(device="tpu"), "--hardware"),
    (dict(device="cpu", device_peak_tflops=-1.0), "--peak-tflops"),
    (dict(efficiency=1.5), "--efficiency"),
    (dict(size="1280x"), "size"),  # parsed by config.parse_size, which names the argument
    (dict(image_aspect=-1.0), "--image-aspect"),
])
def test_invalid_combinations_raise_one_line(kwargs, flag):
    with pytest.raises(ConfigError) as info:
        make_plan(**kwargs)
    message = str(info.value)
    assert message.startswith(flag) and "\n" not in message


def test_world_size_message_names_the_product():
    with pytest.raises(ConfigError, match=r"--cfg-size 2 x --ulysses-size 1 = 2"):
        make_plan(world_size=4, cfg_size=2)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(size="832*480", frame_num=5, ulysses_size=8), "tokens per rank"),
    (dict(cfg=False, cfg_size=2), "half the devices idle"),
    (dict(device="h100", offload=False), "exceeds the device's 80 GB"),
    (dict(device="h100", dtype="float32"), "float32 weights on an accelerator"),
    (dict(dit_fsdp=True), "--dit-fsdp on one device"),
    (dict(t5_fsdp=True), "--t5-fsdp on one device"),
    (dict(device="h200"), "offload is on although both experts fit"),
    (dict(ulysses_size=2, t5_fsdp=True, t5_cpu=True), "no effect with --t5-cpu"),
])
def test_wasteful_layouts_warn(kwargs, fragment):
    plan = make_plan(**kwargs)
    assert any(fragment in w for w in plan.warnings), plan.warnings


def test_sensible_layouts_do_not_warn():
    assert make_plan(device="h100").warnings == ()
    assert make_plan(device="ascend-a2", cfg_size=2, ulysses_size=4, dit_fsdp=True, t5_fsdp=True).warnings == ()


def test_a2_without_fsdp_does_not_fit():
    plan = make_plan(device="ascend-a2", ulysses_size=8, offload=False)  # both experts + T5 on 64 GB
    assert plan.memory.peak > 64 * GB and any("exceeds" in w for w in plan.warnings)
    # The engine's default there: offload on (one expert at a time), which fits.
    default = make_plan(device="ascend-a2", ulysses_size=8)
    assert default.offload and default.memory.peak < 64 * GB


# --------------------------------------------------------------------------- rendering
def test_format_plan_is_a_readable_table():
    text = format_plan(make_plan(device="ascend-a2", cfg_size=2, ulysses_size=4, dit_fsdp=True, t5_fsdp=True,
                                 frame_num=81))
    for needle in ("1280x720", "75,600", "PFLOP", "denoise", "Ulysses all-to-all", "Assumptions", "313 TFLOP/s"):
        assert needle in text
    warned = format_plan(make_plan(cfg=False, cfg_size=2))
    assert "Warnings" in warned and "Time estimate" not in warned
    json.dumps(dataclasses.asdict(make_plan()))  # plain data, ready for --json


# --------------------------------------------------------------------------- placement and efficiency
def test_memory_follows_the_engine_placement_on_each_device_kind():
    """The engine keeps both experts on the CPU (no offload there) and offloads on a single
    accelerator; the plan must place the weights the same way."""
    cpu = make_plan(device="cpu", dtype="float32")  # the released 14B experts in float32 on the host
    assert cpu.placement == "cpu" and not cpu.offload
    assert _row(cpu, "DiT weights (2 experts)")[3] == 2 * count_dit_params(**DIT)[0] * 4
    assert 150 * GB < cpu.memory.peak < 180 * GB  # ~164 GB, not the 84 GB of an offloaded layout
    assert 75 * GB < make_plan(device="cpu", dtype="float32", offload=True).memory.peak < 95 * GB
    assert make_plan(placement="cpu").offload is False and make_plan(placement="cuda:1").offload is True
    assert make_plan(device="h200").offload and not make_plan(device="h200", ulysses_size=8, dit_fsdp=True).offload
    assert make_plan(device="h100", ulysses_size=8).offload  # replicated experts swap, as the engine does
    with pytest.raises(ConfigError, match="--device"):
        make_plan(placement="tpu")
    with pytest.raises(ConfigError, match="--dit-fsdp"):
        make_plan(ulysses_size=8, dit_fsdp=True, offload=True)
    assert not any("float32 weights on an accelerator" in w for w in cpu.warnings)


def test_efficiency_defaults_per_device_with_their_source():
    h200 = make_plan(device="h200")
    assert h200.efficiency == 0.61 and "measured" in h200.efficiency_source
    assert "docs/performance.md" in h200.efficiency_source
    assert any("efficiency 0.61: measured" in a for a in h200.assumptions)
    h100 = make_plan(device="h100")
    assert h100.efficiency == 0.61 and "not measured on an H100" in h100.efficiency_source
    a2 = make_plan(device="ascend-a2")
    assert a2.efficiency == 0.40 and "assumed" in a2.efficiency_source
    given = make_plan(device="h200", efficiency=0.5)
    assert given.efficiency == 0.5 and given.efficiency_source == "given (--efficiency)"
    assert given.timing.compute_per_step_s == pytest.approx(h200.timing.compute_per_step_s * 0.61 / 0.5)


def test_host_memory_of_offloaded_weights():
    expert = bf16_expert_bytes()
    t5 = count_t5_params(**constants()["umt5_xxl_encoder"]) * 2
    single = make_plan(device="h200")  # offload: both experts' host copies and T5 stay in RAM
    assert single.host_bytes_per_rank == 2 * expert + t5 and "host memory" in format_plan(single)
    assert make_plan(device="h200", offload=False).host_bytes_per_rank == 0
    assert make_plan(device="h200", offload=False, t5_cpu=True).host_bytes_per_rank == t5
    assert make_plan(device="cpu").host_bytes_per_rank == 0  # the device is the host
    replicated = make_plan(device="h100", ulysses_size=8)
    assert any("each of the 8 ranks keeps" in w for w in replicated.warnings)
    assert make_plan(device="h100", ulysses_size=8, dit_fsdp=True, t5_fsdp=True).host_bytes_per_rank == 0


def test_plan_device_follows_the_engines_rule():
    """`plan --device` accepts exactly what `i2v --device` accepts (`config.check_device_name`)."""
    from wanengine.config import EngineConfig
    from wanengine.plan import placement_kind

    for bad in ("cuda:abc", " CPU ", "gpu"):
        with pytest.raises(ConfigError, match="^--device: "):
            placement_kind(bad, None)
        with pytest.raises(ConfigError):
            EngineConfig(ckpt_dir="x", device=bad).validate()
    assert placement_kind("npu:1", None) == "accelerator" and placement_kind("cpu", None) == "cpu"
