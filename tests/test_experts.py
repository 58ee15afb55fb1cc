"""Expert placement and the asynchronous prefetch at the MoE boundary, on the CPU through a
fake device runtime that records what the switcher asks of it (streams, events, pinning,
free memory); plus the denoising loop's announcement of the switch."""
from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from wanengine.experts import ExpertSwitcher
from wanengine.pipeline import HIGH, LOW, denoise, next_expert_within

MARGIN = 100


class FakeOps:
    """`DeviceOps` double: configurable free memory; copies are clones handed back with an event."""

    def __init__(self, free: int, transient: int = 0) -> None:
        self.free, self.transient = free, transient
        self.log: List[tuple] = []
        self.copied: List[torch.Tensor] = []

    def free_bytes(self) -> int:
        return self.free

    def transient_bytes(self) -> int:
        return self.transient

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        self.log.append(("pin",))
        return tensor.clone()

    def copy_in(self, tensors):
        event = object()
        self.copied = [t.clone() for t in tensors]
        self.log.append(("copy_in", len(tensors), event))
        return self.copied, event

    def wait(self, event, tensors) -> None:
        self.log.append(("wait", event, len(tensors)))


def _experts():
    torch.manual_seed(0)
    return {HIGH: nn.Linear(8, 8), LOW: nn.Linear(8, 8)}


def _ptrs(module: nn.Module) -> List[int]:
    return [p.data_ptr() for p in module.parameters()]


def _switcher(free: int, transient: int = 0):
    experts = _experts()
    ops = FakeOps(free, transient)
    return experts, ops, ExpertSwitcher(experts, torch.device("cpu"), offload=True, ops=ops, margin_bytes=MARGIN)


def test_prefetched_expert_is_taken_over_by_waiting_on_its_copy():
    experts, ops, switcher = _switcher(free=10**9)
    high_host = _ptrs(experts[HIGH])  # the pinned host copies, which the modules now hold
    assert [entry[0] for entry in ops.log] == ["pin"] * 4  # both experts' weight + bias, at construction
    ops.log.clear()
    assert switcher.get(HIGH) is experts[HIGH] and switcher.swaps == 1 and not ops.log
    assert switcher.prefetch(LOW)
    kinds = [entry[0] for entry in ops.log]
    assert kinds == ["copy_in"]  # one batch of copies; nothing pinned inside the loop
    event = ops.log[-1][2]
    assert switcher.prefetch(LOW) and len(ops.log) == 1  # in flight already: nothing new
    assert switcher.get(LOW) is experts[LOW]
    assert ops.log[-1] == ("wait", event, 2)  # the compute stream waits; the host does not copy
    assert (switcher.swaps, switcher.prefetches) == (1, 1)
    assert _ptrs(experts[LOW]) == [t.data_ptr() for t in ops.copied]  # the prefetched tensors
    assert _ptrs(experts[HIGH]) == high_host  # back on its (pinned) host copy, without a copy back
    assert switcher.get(LOW) is experts[LOW] and len(ops.log) == 2  # resident: no work


def test_no_room_for_both_means_no_prefetch_and_a_plain_swap():
    experts, ops, switcher = _switcher(free=10)
    ops.log.clear()
    switcher.get(HIGH)
    assert not switcher.prefetch(LOW)
    assert ops.log == []
    switcher.get(LOW)
    assert (switcher.swaps, switcher.prefetches) == (2, 0)
    torch.testing.assert_close(experts[LOW](torch.ones(1, 8)), _experts()[LOW](torch.ones(1, 8)))


@pytest.mark.parametrize("spare, started", [(-1, False), (0, True)])
def test_room_counts_the_expert_the_activation_peak_and_the_margin(spare, started):
    experts = _experts()
    need = sum(p.numel() * p.element_size() for p in experts[LOW].parameters())
    ops = FakeOps(free=need + 5000 + MARGIN + spare, transient=5000)
    switcher = ExpertSwitcher(experts, torch.device("cpu"), offload=True, ops=ops, margin_bytes=MARGIN)
    assert switcher.nbytes(LOW) == need
    switcher.get(HIGH)
    assert switcher.prefetch(LOW) is started


def test_pinning_happens_once_at_construction_across_generations():
    _, ops, switcher = _switcher(free=10**9)
    for _ in range(2):  # two videos: high -> low, then back to high (synchronously) and low again
        switcher.get(HIGH)
        switcher.prefetch(LOW)
        switcher.get(LOW)
    assert [entry[0] for entry in ops.log].count("pin") == 4  # weight + bias of both experts, at load
    assert (switcher.swaps, switcher.prefetches) == (2, 2)


def test_an_unused_prefetch_is_dropped_when_another_expert_is_needed():
    _, _, switcher = _switcher(free=10**9)
    switcher.get(HIGH)
    switcher.prefetch(LOW)
    switcher.get(HIGH)  # still high (e.g. a schedule that changed its mind): stays resident
    assert switcher.prefetches == 0 and switcher._staged
    _, _, other = _switcher(free=10**9)
    other.prefetch(LOW)  # staged while nothing is resident
    other.get(HIGH)  # the staged copy is dropped, high moves in synchronously
    assert not other._staged and other.swaps == 1
    other.get(LOW)  # no stale prefetch is used: a plain swap
    assert (other.swaps, other.prefetches) == (2, 0)


def test_without_offload_everything_is_resident_and_prefetch_is_a_no_op():
    experts = _experts()
    ops = FakeOps(free=0)
    switcher = ExpertSwitcher(experts, torch.device("cpu"), offload=False, ops=ops)
    assert switcher.prefetch(LOW) and switcher.get(LOW) is experts[LOW] and switcher.get(HIGH) is experts[HIGH]
    assert ops.log == [] and switcher.swaps == 0


def test_cpu_offload_has_no_device_runtime():
    switcher = ExpertSwitcher(_experts(), torch.device("cpu"), offload=True)
    assert switcher.ops is None and not switcher.prefetch(LOW)
    switcher.get(HIGH)
    switcher.get(LOW)
    assert switcher.swaps == 2


# --------------------------------------------------------------------------- the loop's announcement
def test_next_expert_within_looks_ahead_only_for_a_change():
    timesteps = [999, 980, 950, 800, 600]  # high, high, high, low, low (boundary 900)
    assert [next_expert_within(timesteps, i, 2) for i in range(5)] == [None, LOW, LOW, None, None]
    assert [next_expert_within(timesteps, i, 1) for i in range(5)] == [None, None, LOW, None, None]
    assert next_expert_within(timesteps, 1, 0) is None


class _FakeSampler:
    def __init__(self, timesteps):
        self.timesteps = torch.tensor(timesteps)

    def step(self, flow, t, latent):
        return latent - 0.01 * flow


@pytest.mark.parametrize("timesteps, prefetch_at", [
    ([999, 980, 950, 800, 600], [1, 2]),  # announced two steps ahead
    ([999, 937, 833, 624], [1]),  # the first high step runs before anything is announced
    ([999, 800], []),  # no high step has run when the switch is next
])
def test_denoise_announces_the_switch_after_the_current_expert_ran(timesteps, prefetch_at):
    events = []

    def get_expert(name):
        events.append(("get", name))
        return name

    def prefetch(name):
        events.append(("prefetch", name))

    def guidance(expert, latent, t, contexts, y, seq_len, scale):
        events.append(("step", expert))
        return torch.ones_like(latent)

    denoise(get_expert=get_expert, sampler=_FakeSampler(timesteps), latent=torch.zeros(2), y=torch.zeros(2),
            contexts=(torch.zeros(1), torch.zeros(1)), seq_len=1, guide_scale=(3.5, 3.5), guidance=guidance,
            prefetch=prefetch, prefetch_steps=2)
    steps = [i for i, e in enumerate(events) if e[0] == "step"]
    announced = [sum(1 for s in steps if s < i) for i, e in enumerate(events) if e[0] == "prefetch"]
    assert announced == prefetch_at  # index of the step each announcement precedes
    for i, event in enumerate(events):
        if event[0] == "prefetch":  # after this step's expert is in place, before its work
            assert events[i - 1][0] == "get" and events[i + 1][0] == "step"
            assert event[1] == LOW and events[i - 1][1] == HIGH


def test_release_returns_the_resident_module_to_its_host_copy():
    experts, ops, switcher = _switcher(free=10**9)
    host = _ptrs(experts[LOW])
    switcher.get(LOW)
    switcher.release()
    assert _ptrs(experts[LOW]) == host and switcher._resident is None
    switcher.release()  # nothing resident: a no-op
    assert switcher.get(LOW) is experts[LOW] and switcher.swaps == 2
