"""Parallel layer, single-process parts: rank layout of the CFG x Ulysses groups, VAE tile
grids and bands, backends per device, and the layout errors raised before any group exists."""
from __future__ import annotations

import pytest

from wanengine.config import EngineConfig
from wanengine.errors import ConfigError
from wanengine.parallel import is_writer
from wanengine.parallel.groups import backend_for, cfg_pair_ranks, init_parallel, ulysses_ranks
from wanengine.parallel.vae_split import Tiling, split_sizes, tile_grid


def test_ulysses_groups_are_contiguous_and_cfg_pairs_span_branches() -> None:
    # cfg 2 x ulysses 4 on 8 ranks: branches [0..3] and [4..7]; pairs (u, 4 + u)
    assert ulysses_ranks(0, 4) == [0, 1, 2, 3]
    assert ulysses_ranks(1, 4) == [4, 5, 6, 7]
    assert [cfg_pair_ranks(u, 2, 4) for u in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # every rank is in exactly one Ulysses group and one CFG pair
    for cfg_size, sp in ((1, 8), (2, 4), (2, 1), (1, 1)):
        ulysses = sorted(r for g in range(cfg_size) for r in ulysses_ranks(g, sp))
        pairs = sorted(r for u in range(sp) for r in cfg_pair_ranks(u, cfg_size, sp))
        assert ulysses == pairs == list(range(cfg_size * sp))


def test_backend_follows_the_device() -> None:
    assert (backend_for("npu"), backend_for("cuda"), backend_for("cpu")) == ("hccl", "nccl", "gloo")


@pytest.mark.parametrize("world, grid", [(1, (1, 1)), (2, (2, 1)), (4, (2, 2)), (8, (4, 2)), (6, (3, 2)), (3, (3, 1))])
def test_tile_grid_matches_the_spec_layouts(world: int, grid: tuple) -> None:
    assert tile_grid(world, 90, 160) == grid  # 720p latent: 4x2 for 8 ranks, 2x2 for 4, 2x1 for 2


def test_tile_grid_adapts_or_gives_up_on_tiny_frames() -> None:
    assert tile_grid(4, 1, 8) == (1, 4)  # one latent row: split the columns instead
    assert tile_grid(8, 2, 2) is None  # 4 latent pixels cannot feed 8 tiles
    assert tile_grid(2, 1, 1) is None


def test_split_sizes_cover_the_range_without_gaps() -> None:
    assert split_sizes(5, 2) == [(0, 3), (3, 5)]
    assert split_sizes(90, 4) == [(0, 23), (23, 46), (46, 68), (68, 90)]
    for total, parts in ((7, 3), (12, 4), (3, 3)):
        bounds = split_sizes(total, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(bounds, bounds[1:]))


def test_tiling_neighbours_and_boxes_on_a_2x2_grid() -> None:
    tiles = [Tiling(2, 2, i, 5, 7, None) for i in range(4)]
    assert [t.latent_box() for t in tiles] == [(0, 3, 0, 4), (0, 3, 4, 7), (3, 5, 0, 4), (3, 5, 4, 7)]
    top_left, bottom_right = tiles[0], tiles[3]
    assert (top_left.up, top_left.down, top_left.left, top_left.right) == (None, 2, None, 1)
    assert (bottom_right.up, bottom_right.down, bottom_right.left, bottom_right.right) == (1, None, 2, None)


def test_layout_mismatch_is_one_config_error_before_any_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="cfg_size=2 x ulysses_size=2 = 4 ranks, but the job has 3"):
        init_parallel(2, 2, "cpu")


def test_is_writer_is_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert not is_writer()
    monkeypatch.setenv("RANK", "0")
    assert is_writer()


def test_world_size_is_cfg_times_ulysses() -> None:
    cfg = EngineConfig(ckpt_dir="x", cfg_size=2, ulysses_size=4)
    assert cfg.world_size == 8 and cfg.distributed


def test_sharded_experts_cannot_be_offloaded(golden_ckpt):
    from wanengine.parallel.engine import ParallelEngine

    cfg = EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dit_fsdp=True, offload_model=True)
    with pytest.raises(ConfigError, match="dit_fsdp=True with offload_model=True"):
        ParallelEngine(cfg)  # refused before any process group or weight


def test_step_cache_with_fsdp1_is_refused_before_any_group(golden_ckpt, monkeypatch):
    """Under FSDP1 (torch < 2.4) the wrapper would hide the patched blocks and the cache would
    silently skip nothing: refused with one line, before joining a process group."""
    import wanengine.parallel.engine as parallel_engine

    monkeypatch.setattr(parallel_engine, "fsdp2_available", lambda: False)
    monkeypatch.setattr(parallel_engine, "init_parallel", lambda *a, **k: pytest.fail("joined a group"))
    cfg = EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dit_fsdp=True, step_cache="first-block",
                       cache_threshold=0.1)
    with pytest.raises(ConfigError, match=r"^step_cache='first-block' with dit_fsdp=True needs FSDP2") as info:
        parallel_engine.ParallelEngine(cfg)
    assert info.value.cli_message.startswith("--step-cache first-block with --dit-fsdp needs FSDP2")
