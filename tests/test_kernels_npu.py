"""The `npu` kernels backend on CPU, through the contract-enforcing `torch_npu` double.

`fake_torch_npu` is installed as `sys.modules["torch_npu"]`, the backend is selected, and
every op is compared with the reference math while the recorded operator calls prove the
work went through `torch_npu` with the documented arguments. The double raises on any
contract violation (tests/test_fake_torch_npu.py proves each rule), so a backend that broke
a contract fails here instead of passing silently. Real Wan dims: D 5120, 40 heads of 128.

Bounds (rel_err = max|a - b| / max|b| against the float32 reference from the same rounded
inputs; observed on CPU in brackets):
- attention, FA: bf16 1e-2 [2.9e-3], fp16 2e-3 [3.0e-4], fp32 1e-5 [0: the double computes the
  reference's float32 math; a device's kernel accumulates differently, hence the bound] (float32
  passes float32); fp32 with WANENGINE_NPU_FP32_ATTENTION=0 or through FIA (cast to bf16)
  1.5e-2 [5.5e-3].
- rotary: bf16 1.6e-2 [4.2e-3] (the cos/sin tables are rounded to bf16 too), fp16 2e-3
  [5.8e-4], fp32 exact.
- norms as in test_kernels.py (bf16 [5.8e-3], fp16 [7.9e-4], fp32 [7.5e-8]).
- the golden tiny DiT and the golden end-to-end case: see the tables at those tests.
"""
from __future__ import annotations

import json
import sys
from types import ModuleType
from typing import Iterator

import pytest
import torch

import fake_torch_npu as fake
from helpers import rel_err
from wanengine import device as device_module
from wanengine import kernels
from wanengine.errors import ConfigError
from wanengine.kernels import dispatch, reference

DIM, HEADS, HEAD_DIM = 5120, 40, 128
SCALE = HEAD_DIM ** -0.5
BACKEND_MODULE = "wanengine.kernels.npu_backend"
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATTN_TOL_CAST_FP32 = 1.5e-2  # float32 q/k/v run in bf16
ROTARY_TOL = {torch.float32: 0.0, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NPU_ENV = ("WANENGINE_NPU_ATTENTION", "WANENGINE_NPU_FP32_ATTENTION", dispatch.ENV_VAR)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _load_backend(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """Import the npu backend afresh (its import-time choices read `env`) and make it the default."""
    for name in NPU_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop(BACKEND_MODULE, None)
    assert kernels.configure("npu") == "npu"
    module = sys.modules[BACKEND_MODULE]
    assert module.torch_npu is fake
    return module


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The double installed as torch_npu (a fresh process's state), the npu backend the
    process default; all undone afterwards."""
    fake.reset()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(device_module, "_ascend_runtime_configured", False)
    monkeypatch.setattr(dispatch, "_default", dispatch._default)  # restored at teardown
    yield _load_backend(monkeypatch)
    sys.modules.pop(BACKEND_MODULE, None)  # its import bound the double; never leak it
    fake.reset()


def _qkv(batch: int, seq_q: int, seq_k: int, dtype: torch.dtype, head_dim: int = HEAD_DIM, heads: int = HEADS):
    return tuple(_randn(batch, s, heads, head_dim, seed=i).to(dtype) for i, s in ((1, seq_q), (2, seq_k), (3, seq_k)))


def _rope_tables(seq: int, head_dim: int = HEAD_DIM):
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(head_dim // 2) / (head_dim // 2))
    cos = angles.cos().repeat_interleave(2, -1).float()[None, :, None]
    sin = angles.sin().repeat_interleave(2, -1).float()[None, :, None]
    return cos, sin


def _attention_reference(q, k, v, scale=SCALE, k_lens=None):
    return reference.attention(q.float(), k.float(), v.float(), scale=scale, k_lens=k_lens)


# ----------------------------------------------------------------------------- runtime settings


def test_selecting_the_npu_kernels_applies_the_runtime_settings_once(npu: ModuleType) -> None:
    """Selected by `configure("npu")` (the fixture): compile mode and internal format are set,
    once -- preparing an NPU device afterwards does not repeat them."""
    assert fake.runtime.jit_compile is False and fake.runtime.allow_internal_format is False
    device_module.configure_ascend_runtime()
    assert fake.runtime.compile_mode_calls == 1


def test_npu_kernels_chosen_by_the_environment_can_run_interleaved_rope(npu: ModuleType,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The path the issue found broken: the backend chosen by WANENGINE_KERNEL_BACKEND on
    first use (no configure, no prepared device) must still set the compile mode first."""
    fake.reset()
    monkeypatch.setattr(device_module, "_ascend_runtime_configured", False)
    sys.modules.pop(BACKEND_MODULE, None)
    dispatch._default = None
    monkeypatch.setenv(dispatch.ENV_VAR, "npu")
    x = _randn(1, 6, 2, 16, seed=1)
    cos, sin = _rope_tables(6, 16)
    out = kernels.rotary(x, cos, sin)
    assert fake.ops_called() == ["npu.set_compile_mode", "npu.config.allow_internal_format", "npu_rotary_mul"]
    assert torch.equal(out, reference.rotary(x, cos, sin))


def test_unknown_npu_environment_values_are_config_errors(npu: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="^WANENGINE_NPU_ATTENTION='flash'"):
        _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION="flash")
    with pytest.raises(ConfigError, match="^WANENGINE_NPU_FP32_ATTENTION='yes'"):
        _load_backend(monkeypatch, WANENGINE_NPU_FP32_ATTENTION="yes")


# ----------------------------------------------------------------------------- every op at real dims


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_every_op_goes_through_torch_npu(npu: ModuleType, dtype: torch.dtype) -> None:
    batch, seq = 1, 97
    q, k, v = _qkv(batch, seq, seq, dtype)
    out = kernels.attention(q, k, v, scale=SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, _attention_reference(q, k, v)) <= ATTN_TOL[dtype]

    cos, sin = _rope_tables(seq)
    rot = kernels.rotary(q, cos, sin)
    assert rot.dtype == dtype and rel_err(rot, reference.rotary(q.float(), cos, sin)) <= ROTARY_TOL[dtype]

    x = (_randn(batch, seq, DIM, seed=4, scale=3.0) + 0.5).to(dtype)
    weight, bias = (1 + 0.2 * _randn(DIM, seed=5)).to(dtype), (0.1 * _randn(DIM, seed=6)).to(dtype)
    scale, shift = 0.3 * _randn(batch, 1, DIM, seed=7), 0.3 * _randn(batch, 1, DIM, seed=8)
    xf, wf, bf = x.float(), weight.float(), bias.float()
    for got, want in (
        (kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(xf, wf, 1e-6)),
        (kernels.layer_norm(x, weight, bias, 1e-6), reference.layer_norm(xf, wf, bf, 1e-6)),
        (kernels.layer_norm(x, None, None, 1e-6), reference.layer_norm(xf, None, None, 1e-6)),
        (kernels.layer_norm_modulate(x, scale, shift, 1e-6), reference.layer_norm_modulate(xf, scale, shift, 1e-6)),
    ):
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_err(got, want) <= NORM_TOL[dtype]

    ops = [c for c in fake.calls if not c.op.startswith("npu.")]
    assert [c.op for c in ops] == [
        "npu_fusion_attention", "npu_rotary_mul", "npu_rms_norm",
        "npu_layer_norm_eval", "npu_layer_norm_eval", "npu_layer_norm_eval",
    ]
    fa, rotary, rms, ln_affine, ln_plain, ln_mod = ops
    assert fa.args["query"].dtype == dtype and fa.args["input_layout"] == "BSND"  # float32 stays float32
    assert fa.args["head_num"] == HEADS and fa.args["keep_prob"] == 1.0 and fa.args["atten_mask"] is None
    assert "scale" in fa.explicit and fa.args["scale"] == pytest.approx(SCALE)
    assert rotary.args["rotary_mode"] == "interleave"
    assert rotary.args["r1"].shape == (1, seq, 1, HEAD_DIM) and rotary.args["r1"].dtype == dtype
    assert rms.args["gamma"].dtype == dtype and rms.args["epsilon"] == 1e-6
    for call in (ln_affine, ln_plain, ln_mod):
        assert call.args["normalized_shape"] == [DIM] and call.args["eps"] == 1e-6
    if dtype == torch.float32:  # affine fused into the op only where the reference is float32 throughout
        assert ln_affine.args["weight"] is not None
    assert torch.allclose(ln_mod.args["weight"], 1 + scale[0, 0]) and torch.equal(ln_mod.args["bias"], shift[0, 0])
    assert ln_mod.args["input"].dtype == torch.float32  # the reference modulates in float32


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("op", ["fa", "fia"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_attention_key_lengths(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, op: str, dtype: torch.dtype) -> None:
    _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION=op)
    # batch 1, shorter k_lens: keys sliced, no mask
    q, k, v = _qkv(1, 133, 133, dtype)
    lens = torch.tensor([101])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert rel_err(out, _attention_reference(q, k, v, k_lens=lens)) <= ATTN_TOL[dtype]
    call = fake.calls[-1]
    assert call.args["key"].shape[1] == 101 and call.args["atten_mask"] is None

    # k_lens equal to the key length: no mask, nothing sliced
    kernels.attention(q, k, v, scale=SCALE, k_lens=torch.tensor([133]))
    assert fake.calls[-1].args["key"].shape[1] == 133 and fake.calls[-1].args["atten_mask"] is None

    # batch 2, ragged: FA gets the inverted bool mask [B, 1, Sq, Skv] (True = masked out),
    # FIA the per-sample key counts
    q, k, v = _qkv(2, 65, 65, dtype)
    lens = torch.tensor([65, 37])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert rel_err(out, _attention_reference(q, k, v, k_lens=lens)) <= ATTN_TOL[dtype]
    call = fake.calls[-1]
    if op == "fa":
        mask = call.args["atten_mask"]
        assert mask.dtype == torch.bool and mask.shape == (2, 1, 65, 65)
        assert not mask[0].any() and mask[1, :, :, 37:].all() and not mask[1, :, :, :37].any()
    else:
        assert call.args["atten_mask"] is None and call.args["actual_seq_lengths_kv"] == [65, 37]

    # cross attention: 512 keys, batch 2
    q, k, v = _qkv(2, 50, 512, dtype)
    out = kernels.attention(q, k, v, scale=SCALE)
    assert rel_err(out, _attention_reference(q, k, v)) <= ATTN_TOL[dtype]


@pytest.mark.parametrize("fp32_env,expected_dtype,tol", [
    (None, torch.float32, ATTN_TOL[torch.float32]),  # default: FA takes float32
    ("1", torch.float32, ATTN_TOL[torch.float32]),
    ("0", torch.bfloat16, ATTN_TOL_CAST_FP32),  # opt-out for a stack whose kernel lacks it
], ids=["default", "on", "opt-out"])
def test_float32_fusion_attention(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, fp32_env, expected_dtype, tol) -> None:
    env = {} if fp32_env is None else {"WANENGINE_NPU_FP32_ATTENTION": fp32_env}
    _load_backend(monkeypatch, **env)
    q, k, v = _qkv(2, 65, 65, torch.float32)
    lens = torch.tensor([65, 50])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    call = fake.calls[-1]
    assert call.op == "npu_fusion_attention" and call.args["query"].dtype == expected_dtype
    assert out.dtype == torch.float32 and rel_err(out, _attention_reference(q, k, v, k_lens=lens)) <= tol


@pytest.mark.parametrize("fp32_env", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_id)
def test_fused_infer_attention_never_gets_float32(npu: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                 dtype: torch.dtype, fp32_env: str) -> None:
    """FIA takes fp16/bf16 only: float32 is cast to bf16 whatever WANENGINE_NPU_FP32_ATTENTION says."""
    module = _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION="fia", WANENGINE_NPU_FP32_ATTENTION=fp32_env)
    assert module.ATTENTION_OP == "fia"
    q, k, v = _qkv(2, 65, 65, dtype)
    lens = torch.tensor([65, 37])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert out.dtype == dtype and out.shape == q.shape
    tol = ATTN_TOL_CAST_FP32 if dtype == torch.float32 else ATTN_TOL[dtype]
    assert rel_err(out, _attention_reference(q, k, v, k_lens=lens)) <= tol
    call = fake.calls[-1]
    assert call.op == "npu_fused_infer_attention_score" and call.args["input_layout"] == "BSND"
    assert call.args["query"].dtype == torch.bfloat16 and call.args["query"].shape == (2, 65, HEADS, HEAD_DIM)
    assert call.args["num_heads"] == HEADS and call.args["softmax_lse_flag"] is False
    assert call.args["actual_seq_lengths_kv"] == [65, 37] and call.args["scale"] == pytest.approx(SCALE)


def test_attention_head_dims_follow_each_operators_rule(npu: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(head_dim: int, heads: int = 2):
        fake.calls.clear()
        q, k, v = _qkv(1, 12, 12, torch.bfloat16, head_dim=head_dim, heads=heads)
        out = kernels.attention(q, k, v, scale=head_dim ** -0.5, k_lens=torch.tensor([9]))
        assert out.shape == q.shape
        assert rel_err(out, _attention_reference(q, k, v, head_dim ** -0.5, torch.tensor([9]))) <= ATTN_TOL[torch.bfloat16]
        return [(c.op, c.args["query"].shape[-1]) for c in fake.calls]

    # FA: any head dim 1..768, no padding; beyond that the reference math
    assert run(24) == [("npu_fusion_attention", 24)]
    assert run(600) == [("npu_fusion_attention", 600)]
    assert run(776) == []
    # FIA: padded to a multiple of 16; beyond 512 FA takes over, beyond 768 the reference
    _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION="fia")
    assert run(24) == [("npu_fused_infer_attention_score", 32)]
    assert run(512) == [("npu_fused_infer_attention_score", 512)]
    assert run(520) == [("npu_fusion_attention", 520)]
    assert run(776) == []


def test_fusion_attention_splits_more_than_256_heads(npu: ModuleType) -> None:
    q, k, v = _qkv(1, 8, 8, torch.bfloat16, head_dim=16, heads=300)
    out = kernels.attention(q, k, v, scale=0.25)
    assert [c.args["head_num"] for c in fake.calls if c.op == "npu_fusion_attention"] == [256, 44]
    assert rel_err(out, _attention_reference(q, k, v, 0.25)) <= ATTN_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("batch,calls", [(24, [24]), (25, [24, 1]), (50, [24, 24, 2])])
def test_interleaved_rope_is_split_to_keep_batch_times_heads_under_1000(npu: ModuleType, batch: int, calls) -> None:
    x = _randn(batch, 3, HEADS, HEAD_DIM, seed=30)
    cos, sin = _rope_tables(3)
    out = kernels.rotary(x, cos, sin)
    assert [c.args["input"].shape[0] for c in fake.calls if c.op == "npu_rotary_mul"] == calls
    assert torch.equal(out, reference.rotary(x, cos, sin))  # float32: the split is exact


def test_rope_outside_the_interleave_contract_uses_the_reference(npu: ModuleType) -> None:
    x = _randn(2, 4, 2, 16, seed=31)
    cos, sin = _rope_tables(4, 16)
    per_sample = (cos.expand(2, -1, -1, -1), sin.expand(2, -1, -1, -1))  # BS1D: no interleave table
    fake.calls.clear()
    assert torch.equal(kernels.rotary(x, *per_sample), reference.rotary(x, *per_sample))
    x3 = x[0]  # 3-D
    assert torch.equal(kernels.rotary(x3, cos[0], sin[0]), reference.rotary(x3, cos[0], sin[0]))
    assert fake.calls == []


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("mod_shape,expected_calls,weighted", [
    ((2, 1, DIM), 2, True),  # per-sample rows: one fused call per sample
    ((DIM,), 1, True),  # shared by all samples: one fused call
    ((2, 77, DIM), 1, False),  # per-token: plain LN on the NPU, modulation in torch
])
def test_layer_norm_modulate_fusion_cases(npu: ModuleType, mod_shape, expected_calls: int, weighted: bool) -> None:
    fake.calls.clear()
    x = _randn(2, 77, DIM, seed=9, scale=2.0)
    scale, shift = 0.3 * _randn(*mod_shape, seed=10), 0.3 * _randn(*mod_shape, seed=11)
    out = kernels.layer_norm_modulate(x, scale, shift, 1e-6)
    assert rel_err(out, reference.layer_norm_modulate(x, scale, shift, 1e-6)) <= 1e-5
    assert fake.ops_called() == ["npu_layer_norm_eval"] * expected_calls
    assert all((c.args["weight"] is not None) == weighted for c in fake.calls)


def test_rms_norm_with_float32_weight_on_bf16(npu: ModuleType) -> None:
    """gamma is cast to x's dtype for the op; the result keeps the reference's promoted dtype."""
    x = _randn(1, 33, DIM, seed=12).bfloat16()
    weight = 1 + 0.2 * _randn(DIM, seed=13)
    out = kernels.rms_norm(x, weight, 1e-6)
    want = reference.rms_norm(x, weight, 1e-6)
    assert out.dtype == want.dtype == torch.float32 and rel_err(out, want) <= NORM_TOL[torch.bfloat16]
    assert fake.calls[-1].args["gamma"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- tiny forwards and the golden case

# Golden tiny DiT expert (dim 256, 2 heads of 128, 2 blocks), padded sequence (k_lens < S),
# against the reference release's float32 output. Observed on CPU in brackets.
DIT_BOUNDS = {
    ("fa", "float32"): 1e-4,  # [3.1e-7] float32 throughout: the golden bound
    ("fia", "float32"): 3e-3,  # [7.6e-4] attention in bf16 (FIA has no float32)
    ("fa", "bfloat16"): 1.5e-2,  # [5.2e-3] the model in bf16
    ("fia", "bfloat16"): 1.5e-2,  # [5.2e-3]
}


@pytest.mark.parametrize("op,dtype", list(DIT_BOUNDS), ids=[f"{o}-{d}" for o, d in DIT_BOUNDS])
def test_tiny_dit_forward_through_the_double(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, golden,
                                             op: str, dtype: str) -> None:
    from safetensors.torch import load_file

    from wanengine.models.dit_loading import load_dit

    _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION=op)
    fake.calls.clear()
    g = load_file(str(golden / "dit.safetensors"))
    run_dtype = getattr(torch, dtype)
    model = load_dit(golden / "ckpt" / "low_noise_model", dtype=run_dtype)
    seq_len = int(g["grid"].prod()) + 16  # 16 padding tokens: attention gets k_lens < S
    with torch.no_grad():
        out = model(g["x"][None].to(run_dtype), g["t"], [g["context"].to(run_dtype)], g["y"][None].to(run_dtype), seq_len)
    assert rel_err(out[0], g["out_low"]) <= DIT_BOUNDS[(op, dtype)]
    attention_op = "npu_fusion_attention" if op == "fa" else "npu_fused_infer_attention_score"
    assert set(fake.ops_called()) == {attention_op, "npu_rotary_mul", "npu_rms_norm", "npu_layer_norm_eval"}


# The whole golden i2v case (T5, VAE, both experts, 6 UniPC steps) on the npu kernels, against
# the reference release (float32, CPU). Observed on CPU in brackets.
E2E_BOUNDS = {  # (op, dtype): (final latent rel_err, video max abs)
    ("fa", "float32"): (1e-4, 1e-3),  # [4.6e-7, 5.2e-6] the golden float32 bounds
    ("fia", "float32"): (3e-3, 1e-2),  # [7.7e-4, 3.1e-3] attention in bf16
    ("fa", "bfloat16"): (1.5e-2, 5e-2),  # [4.2e-3, 1.3e-2] the bf16 bounds of test_i2v_golden.py
    ("fia", "bfloat16"): (1.5e-2, 5e-2),  # [4.2e-3, 1.3e-2]
}
_npu_engines: dict = {}  # dtype -> Engine on the npu kernels: loaded once, both operators run on it


@pytest.mark.parametrize("op,dtype", list(E2E_BOUNDS), ids=[f"{o}-{d}" for o, d in E2E_BOUNDS])
def test_golden_end_to_end_through_the_double(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, golden,
                                              op: str, dtype: str) -> None:
    from safetensors.torch import load_file

    from wanengine import Engine, EngineConfig

    if dtype not in _npu_engines:
        _npu_engines[dtype] = Engine(EngineConfig(ckpt_dir=str(golden / "ckpt"), device="cpu", dtype=dtype,
                                                  kernel_backend="npu", progress=False))
    engine = _npu_engines[dtype]
    # The operator choice is made at the backend's import; switch it on the engine's own module.
    monkeypatch.setattr(engine.kernel_set.module, "ATTENTION_OP", op)
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    ref = load_file(str(golden / "i2v.safetensors"))
    fake.calls.clear()
    video = engine.i2v(golden / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"], max_area=meta["max_area"],
                       frame_num=meta["frame_num"], steps=meta["steps"], shift=meta["shift"], solver=meta["solver"],
                       guide_scale=tuple(meta["guide_scale"]), seed=meta["seed"])
    latent_bound, video_bound = E2E_BOUNDS[(op, dtype)]
    assert engine.kernel_backend == "npu" and video.metadata["kernel_backend"] == "npu"
    assert rel_err(video.latent, ref["latents"][-1]) <= latent_bound
    assert float((video.tensor - ref["video"]).abs().max()) <= video_bound
    attention_op = "npu_fusion_attention" if op == "fa" else "npu_fused_infer_attention_score"
    other_op = "npu_fused_infer_attention_score" if op == "fa" else "npu_fusion_attention"
    assert attention_op in fake.ops_called() and other_op not in fake.ops_called()
    assert {"npu_rotary_mul", "npu_rms_norm", "npu_layer_norm_eval"} <= set(fake.ops_called())
