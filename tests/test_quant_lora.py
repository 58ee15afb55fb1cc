"""LoRA deltas on 8-bit experts (`quant.lora`): merged into the dequantized weight and
re-quantized while streaming, or -- with `--quantize` -- merged in full precision and
quantized once. Float32 DiT forwards against the test's own copy (`Q(W + delta)` dequantized,
written by the test from the spec's rule): equal (<= 1e-5, seen 0.0); the re-quantized weight
is within the int8 bound of the exact `dequantize(q) + delta`.

The merger here is a minimal stand-in with the `adapters.merge.AdapterMerger` interface
(`targets`, `merge_(name, tensor)`: float32 accumulation, cast back), so these tests do not
depend on the adapter file formats.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from quant_files import quantize_file, read_expert, spec_int8_rows, write_expert
from wanengine.models import load_dit
from wanengine.quant.linear8 import eight_bit_modules
from wanengine.quant.loading import load_expert

LOW = "low_noise_model"
TARGETS = ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight", "text_embedding.0.weight")


class LowRankMerger:
    """`delta = up @ down` per target (rank 4), added in float32 and cast back, in place."""

    def __init__(self, shapes: Dict[str, torch.Size], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.deltas = {name: torch.randn(shape[0], 4, generator=generator) @ torch.randn(4, shape[1], generator=generator)
                       * 2e-3 for name, shape in shapes.items()}
        self.targets = list(self.deltas)
        self.merged = []

    def merge_(self, name: str, tensor: torch.Tensor, start: int = 0) -> bool:
        total = tensor.to(torch.float32, copy=True) + self.deltas[name][start:start + tensor.shape[0]]
        tensor.copy_(total)
        self.merged.append(name)
        return True


@pytest.fixture(scope="module")
def case(golden: Path, golden_ckpt: Path):
    data = load_file(str(golden / "dit.safetensors"))
    context = [data["context"]] if data["context"].dim() == 2 else list(data["context"])
    expert = read_expert(golden_ckpt / LOW)
    return (data["x"], data["t"], context, data["y"]), expert


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_lora_on_a_stored_int8_expert_is_merged_then_requantized(tmp_path: Path, golden_ckpt: Path, case) -> None:
    inputs, expert = case
    stored, dequantized = quantize_file(expert, "lightx2v-int8")
    write_expert(tmp_path / "int8", stored, golden_ckpt / LOW)
    merger = LowRankMerger({n: expert[n].shape for n in TARGETS})
    model = load_expert(tmp_path / "int8", dtype=torch.float32, merger=merger)
    assert sorted(merger.merged) == sorted(TARGETS)
    copy = dict(dequantized)  # the test's own: Q(dequantized + delta) for 8-bit layers, W + delta otherwise
    for name in TARGETS:
        merged = dequantized[name] + merger.deltas[name]
        if name.startswith("blocks."):
            q, scale = spec_int8_rows(merged)
            copy[name] = q.float() * scale
            # accuracy of merge-and-requantize against the exact merged weight: the int8 bound
            assert bool(((copy[name] - merged).abs() <= scale / 2 + merged.abs() * 2.0 ** -22).all())
        else:
            copy[name] = merged
    write_expert(tmp_path / "copy", copy, golden_ckpt / LOW)
    layer = eight_bit_modules(model)["blocks.0.self_attn.q"]
    assert layer.weight.dtype == torch.int8
    assert float((_forward(model, inputs) - _forward(load_dit(tmp_path / "copy", dtype=torch.float32), inputs))
                 .abs().max()) <= 1e-5


def test_lora_with_quantize_at_load_is_merged_before_quantizing_once(tmp_path: Path, golden_ckpt: Path,
                                                                      case) -> None:
    inputs, expert = case
    merger = LowRankMerger({n: expert[n].shape for n in TARGETS}, seed=1)
    model = load_expert(golden_ckpt / LOW, dtype=torch.float32, quantize=torch.int8, merger=merger)
    merged = {n: (w.float() + merger.deltas[n] if n in TARGETS else w.float()) for n, w in expert.items()}
    _, copy = quantize_file(merged, "lightx2v-int8")  # Q(W + delta), dequantized, by the spec's rule
    write_expert(tmp_path / "copy", copy, golden_ckpt / LOW)
    assert float((_forward(model, inputs) - _forward(load_dit(tmp_path / "copy", dtype=torch.float32), inputs))
                 .abs().max()) <= 1e-5


def test_no_deltas_leave_the_8bit_expert_bit_identical(tmp_path: Path, golden_ckpt: Path, case) -> None:
    _, expert = case
    stored, _ = quantize_file(expert, "lightx2v-int8")
    write_expert(tmp_path / "int8", stored, golden_ckpt / LOW)
    plain = load_expert(tmp_path / "int8", dtype=torch.float32)
    merger = LowRankMerger({})  # e.g. every adapter at strength 0: nothing targeted, nothing read
    same = load_expert(tmp_path / "int8", dtype=torch.float32, merger=merger)
    for (name, a), (_, b) in zip(plain.state_dict().items(), same.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b), name


def test_a_real_lora_file_on_a_stored_int8_expert(tmp_path: Path, golden_ckpt: Path, case) -> None:
    """The engine's own merger (`adapters.merge.AdapterMerger` over a planned LoRA file) on a
    LightX2V int8 expert: the same weights as the stand-in's rule, Q(dequantized + delta)."""
    from lora_helpers import lora_tensors, pair_delta, random_lora, write_lora
    from wanengine.adapters import LoraSpec
    from wanengine.adapters.merge import AdapterMerger
    from wanengine.adapters.plan import plan_adapter

    inputs, expert = case
    modules = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "text_embedding.0")
    pairs = random_lora({n: t.shape for n, t in expert.items()}, modules, rank=4, seed=3)
    adapter = write_lora(tmp_path / "adapter.safetensors", lora_tensors(pairs, "lora_A", "diffusion_model."))
    stored, dequantized = quantize_file(expert, "lightx2v-int8")
    write_expert(tmp_path / "int8", stored, golden_ckpt / LOW)
    plan = plan_adapter(LoraSpec(str(adapter), strength=0.5, expert="low"), LOW,
                        {n: tuple(t.shape) for n, t in expert.items()})
    with AdapterMerger([plan]) as merger:
        model = load_expert(tmp_path / "int8", dtype=torch.float32, merger=merger)
    copy = dict(dequantized)
    for module in modules:
        name = module + ".weight"
        merged = dequantized[name] + pair_delta(pairs[module], 0.5)
        if name.startswith("blocks."):
            q, scale = spec_int8_rows(merged)
            merged = q.float() * scale
        copy[name] = merged
    write_expert(tmp_path / "copy", copy, golden_ckpt / LOW)
    assert eight_bit_modules(model)["blocks.1.ffn.0"].weight.dtype == torch.int8
    assert float((_forward(model, inputs) - _forward(load_dit(tmp_path / "copy", dtype=torch.float32), inputs))
                 .abs().max()) <= 1e-5


def test_the_engine_plans_and_merges_a_lora_into_a_published_int8_expert(tmp_path: Path, golden_ckpt: Path,
                                                                          case) -> None:
    """Through the engine's own preflight: the adapter is planned against the 8-bit expert's
    headers (its weights keep the model's names and shapes; the scales are not targets), merged
    while it streams, and `describe_adapter` (`info --lora`) reads the same checkpoint."""
    from lora_helpers import lora_tensors, random_lora, write_lora
    from quant_files import checkpoint_with_experts
    from wanengine import Engine, EngineConfig
    from wanengine.adapters import LoraSpec
    from wanengine.adapters.inspect import describe_adapter
    from wanengine.io.checkpoint import preflight_checkpoint

    _, expert = case
    modules = ("blocks.0.self_attn.q", "blocks.1.ffn.0")
    pairs = random_lora({n: t.shape for n, t in expert.items()}, modules, rank=4, seed=5)
    adapter = write_lora(tmp_path / "adapter.safetensors", lora_tensors(pairs, "lora_A", "diffusion_model."))
    stored, _ = quantize_file(expert, "lightx2v-int8")
    root = checkpoint_with_experts(tmp_path / "ckpt", golden_ckpt,
                                   {LOW: stored, "high_noise_model": read_expert(golden_ckpt / "high_noise_model")})
    described = describe_adapter(adapter, preflight_checkpoint(root))
    assert described  # planned against both experts, the int8 one included, without an error
    base = dict(ckpt_dir=str(root), device="cpu", dtype="float32", progress=False)
    plain = Engine(EngineConfig(**base))
    merged = Engine(EngineConfig(**base, loras=(LoraSpec(str(adapter), strength=0.5, expert="low"),)))
    low_plain, low_merged = (eight_bit_modules(e.experts.experts[LOW]) for e in (plain, merged))
    assert low_merged["blocks.1.ffn.0"].weight.dtype == torch.int8
    assert not torch.equal(low_plain["blocks.1.ffn.0"].weight, low_merged["blocks.1.ffn.0"].weight)
    assert torch.equal(low_plain["blocks.0.ffn.0"].weight, low_merged["blocks.0.ffn.0"].weight)  # not targeted
