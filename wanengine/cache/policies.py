"""The block loops of the step-cache policies: each replaces `WanDiT.run_blocks` for one
forward (same arguments, same result shape) while a `CacheRun` is active.

- `first-block`: block 0 always runs. Its residual `r0 = block0(x) - x` is compared with the
  one saved at the last fully computed step: `d = sum|r0 - r0_ref| / sum|r0_ref|` over the
  real tokens (= the ratio of the means), accumulated over the steps skipped since. If every
  branch's accumulated value stays below the threshold, blocks 1..L-1 are skipped and the
  residual they added at the last full step is added instead; otherwise they run and their
  residual (and r0) are saved, and the accumulators restart at 0.
- `mag`: nothing runs before the decision; per branch the table's ratios since the last full
  step are multiplied, `err += |1 - product|`; if every branch's err stays below the
  threshold, all blocks are skipped and their saved residual is added to the input.
- `record` (calibrate-cache): every step runs in full; the per-token residual-norm ratio to
  the expert's previous step is recorded per branch.

Parallel safety: the numerator and denominator sums of every branch go into one
`[branches, 2]` tensor, summed over all ranks (`all_reduce`): Ulysses ranks add their
sequence chunks, CFG groups contribute their own branch's rows, so every rank then holds
the whole-sequence statistics of every branch and takes the same decision -- no rank or
group runs blocks the others skip. Padding rows (Ulysses) are left out of the sums, so the
numbers equal the single-device ones up to summation order. A step that only CFG group 0
computes (guidance off for that expert, `CacheRun.cond_only`) is agreed within that group's
Ulysses ranks: the other group does no DiT work then. `mag` needs no collective: its inputs
(table, step, expert) are the same everywhere.

Decisions are taken for the whole step (all branches skip or none does): a batched forward
cannot skip half a batch for free, and CFG-parallel groups must not wait on each other.
The threshold is compared with `<`, so a threshold of 0 never skips, and the full path runs
exactly the original block calls: the output is bit-identical to no cache.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .state import CacheLayout, CacheRun, SlotScalars


def run_block_range(model: nn.Module, tokens: torch.Tensor, inputs, cos: torch.Tensor, sin: torch.Tensor,
                    start: int, stop: Optional[int] = None) -> torch.Tensor:
    """Blocks `start..stop-1` (default: to the end) of `model` on `tokens [B, S, D]` -- the same
    calls as `WanDiT.run_blocks`."""
    for index in range(start, len(model.blocks) if stop is None else stop):
        tokens = model.blocks[index](tokens, inputs.e0, inputs.text, cos, sin, inputs.k_lens)
    return tokens


def real_rows(tokens: torch.Tensor, inputs, layout: CacheLayout) -> int:
    """How many of this rank's rows are real tokens (the rest is Ulysses padding)."""
    chunk, total = tokens.shape[1], inputs.tokens.shape[1]
    start = layout.sp_rank * chunk if layout.sp_size > 1 else 0
    return max(0, min(chunk, total - start))


def agree(local: torch.Tensor, run: CacheRun) -> List[List[float]]:
    """`local [branches, k]` summed over the ranks computing this step (one all-reduce), as host floats."""
    collective, group = run.decision_group()
    if collective:
        import torch.distributed as dist

        from ..parallel.groups import comm_device

        box = local.to(comm_device(group))
        dist.all_reduce(box, op=dist.ReduceOp.SUM, group=group)
        local = box
    return local.double().cpu().tolist()  # the one device -> host sync of a decision


def _skip_or_run(run: CacheRun, model: nn.Module, base: torch.Tensor, inputs, cos: torch.Tensor,
                 sin: torch.Tensor, slots: List[int], skip: bool, start: int) -> torch.Tensor:
    """Skipping: `base [B, S, D]` plus each branch's saved residual. Otherwise blocks `start..`
    on `base`, saving the residual they add, and every branch's accumulators restart."""
    if skip:
        return base + torch.stack([run.tensors[s].residual for s in slots]).float()
    out = run_block_range(model, base, inputs, cos, sin, start)
    for i, slot in enumerate(slots):
        run.slot_tensors(slot).residual = (out[i] - base[i]).to(run.dtype)
    for slot in run.all_slots(base.shape[0]):
        run.scalars[slot] = SlotScalars()
    return out


def first_block(run: CacheRun, model: nn.Module, tokens: torch.Tensor, inputs, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    batch = tokens.shape[0]
    slots = run.slots_for(batch)
    after0 = run_block_range(model, tokens, inputs, cos, sin, 0, 1)
    block0 = after0 - tokens  # [B, S, D] float32
    candidate = run.may_skip(slots)
    skip, distances = False, []
    if candidate:
        rows = real_rows(tokens, inputs, run.layout)
        local = torch.zeros(len(run.all_slots(batch)), 2, dtype=torch.float32, device=tokens.device)
        for i, slot in enumerate(slots):
            ref = run.tensors[slot].block0[:rows].float()
            local[slot, 0] = (block0[i, :rows] - ref).abs().sum()
            local[slot, 1] = ref.abs().sum()
        sums = agree(local, run)
        distances = [num / den if den > 0 else math.inf for num, den in sums]
        totals = [run.slot_scalars(s).accumulated + d for s, d in enumerate(distances)]
        skip = all(total < run.settings.threshold for total in totals)
        if skip:
            for slot, total in enumerate(totals):
                run.slot_scalars(slot).accumulated = total
    out = _skip_or_run(run, model, after0, inputs, cos, sin, slots, skip, 1)
    if not skip:
        for i, slot in enumerate(slots):
            run.slot_tensors(slot).block0 = block0[i].to(run.dtype)
    run.decided(skip, candidate, distances)
    return model.head(out, inputs.e)


def mag(run: CacheRun, model: nn.Module, tokens: torch.Tensor, inputs, cos: torch.Tensor,
        sin: torch.Tensor) -> torch.Tensor:
    batch = tokens.shape[0]
    slots = run.slots_for(batch)
    candidate = run.may_skip(slots)
    skip, values = False, []
    if candidate:
        ratios = [run.table.ratio(run.expert, slot, run.step) for slot in run.all_slots(batch)]
        values = [math.nan if r is None else r for r in ratios]
        if all(r is not None for r in ratios):
            updated = []
            for slot, ratio in enumerate(ratios):
                scalars = run.slot_scalars(slot)
                product = scalars.ratio * ratio
                updated.append((product, scalars.accumulated + abs(1.0 - product)))
            skip = all(err < run.settings.threshold for _, err in updated)
            if skip:
                for slot, (product, err) in enumerate(updated):
                    run.scalars[slot] = SlotScalars(accumulated=err, ratio=product)
    out = _skip_or_run(run, model, tokens, inputs, cos, sin, slots, skip, 0)
    run.decided(skip, candidate, values)
    return model.head(out, inputs.e)


def record(run: CacheRun, model: nn.Module, tokens: torch.Tensor, inputs, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    batch = tokens.shape[0]
    slots = run.slots_for(batch)
    out = run_block_range(model, tokens, inputs, cos, sin, 0)
    residual = out - tokens
    rows = real_rows(tokens, inputs, run.layout)
    previous = [run.tensors[s].residual if s in run.tensors else None for s in slots]
    values: List[float] = []
    if all(p is not None for p in previous):  # the same on every rank: not the expert's first step
        local = torch.zeros(len(run.all_slots(batch)), 2, dtype=torch.float32, device=tokens.device)
        for i, slot in enumerate(slots):
            now = residual[i, :rows].norm(dim=-1)  # [rows] per-token L2 over D
            before = previous[i][:rows].float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            local[slot, 0] = (now / before).sum()
            local[slot, 1] = rows
        values = [total / count if count else math.nan for total, count in agree(local, run)]
        by_slot = run.recorded.setdefault(run.expert or "", {})
        for slot, value in enumerate(values):
            by_slot.setdefault(slot, [None] * run.steps)[run.step] = value
    for i, slot in enumerate(slots):
        run.slot_tensors(slot).residual = residual[i].to(run.dtype)
    run.decided(False, False, values)
    return model.head(out, inputs.e)


BlockLoop = Callable[[CacheRun, nn.Module, torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor]
BLOCK_LOOPS: Dict[str, BlockLoop] = {"first-block": first_block, "mag": mag, "record": record}
