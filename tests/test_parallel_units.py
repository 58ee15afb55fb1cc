"""Parallel building blocks in real multi-process runs (gloo on CPU, one process per rank;
see `_parallel_worker.py`): Ulysses attention and DiT, the split VAE, FSDP sharded loading.

Each test starts fresh processes (a few seconds of start-up each), hence `slow`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from _parallel_worker import launch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

FLOAT_NOISE = 1e-5  # float32 reordering of sums; the golden relative tolerance is 1e-4


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_single_device(golden: Path, tmp_path: Path, world: int) -> None:
    reports = launch(world, "attention", tmp_path)
    for report in reports:
        # the all-to-alls only move data, so the split attention is the same computation
        assert report["roundtrip_exact"] and report["scatter_heads_exact"]
        assert report["attention_max_abs"] <= 1e-6
    if world == 2:  # the golden DiT has 2 heads
        for report in reports:
            assert report["all_to_alls_per_forward"] == 4  # 2 blocks x (q/k/v in, output back)
            assert report["dit_rel_vs_golden"] <= 1e-4
            assert report["dit_rel_vs_single"] <= FLOAT_NOISE
            assert report["dit_padded_rel_vs_golden"] <= 1e-4  # seq_len not a multiple of sp


@pytest.mark.parametrize("world, grid", [(2, [2, 1]), (4, [2, 2])])
def test_split_vae_equals_single_device(golden: Path, tmp_path: Path, world: int, grid: list) -> None:
    for report in launch(world, "vae", tmp_path):
        assert report["grid"] == grid and report["halo_exchanges"] > 0
        assert report["encode_rel_vs_golden"] <= 1e-4
        assert report["decode_rel_vs_golden"] <= 1e-4
        for key in ("golden_encode", "golden_decode", "uneven_encode", "uneven_decode"):
            assert report[f"{key}_max_abs_vs_single"] <= FLOAT_NOISE, key


def test_fsdp_shards_parameters_and_keeps_the_numbers(golden: Path, tmp_path: Path) -> None:
    reports = launch(2, "fsdp", tmp_path)
    for report in reports:
        for key in ("dit_local_fraction", "dit_local_fraction_after_forward", "t5_local_fraction"):
            assert abs(report[key] - 0.5) < 0.01, (key, report[key])  # ~1/world of the bytes
        assert report["dit_rel_vs_golden"] <= 1e-4
        assert report["t5_rel_vs_golden"] <= 1e-4
        # all-gathered shards are the same bf16 values: identical to the unsharded bf16 model
        assert report["dit_bf16_max_abs_vs_unsharded"] <= 1e-6
    assert abs(sum(r["dit_local_fraction"] for r in reports) - 1.0) < 1e-6  # shards partition the expert
