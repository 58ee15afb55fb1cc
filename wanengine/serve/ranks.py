"""What rank 0 tells the other ranks of a torchrun service, and the loop those ranks run.

Rank 0 alone serves HTTP. For every job it broadcasts a `RankMessage` (the options and the
decoded image), then every rank runs the same generation; at every step boundary rank 0
broadcasts its stop decision (cancel or shutdown), so all ranks leave the loop after the same
step and the collectives stay paired. While idle, rank 0 sends a heartbeat every
`HEARTBEAT_S` so the waiting ranks' collectives never reach the process-group timeout; at
shutdown it sends `stop`.

One process (no torchrun) uses `LocalChannel`: nothing to tell anyone.
"""
from __future__ import annotations

import pickle
import signal
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GenerationCancelled

JOB, IDLE, STOP = "job", "idle", "stop"
HEARTBEAT_S = 60.0


@dataclass
class RankMessage:
    kind: str  # JOB, IDLE or STOP
    job_id: Optional[str] = None
    opts: Any = None  # GenerationOptions
    image: Any = None  # RGB PIL image


class LocalChannel:
    """A single-process service: the stop decision is the local one."""

    rank = 0

    def announce(self, message: RankMessage) -> None:
        return None

    def decide_stop(self, stop: bool) -> bool:
        return stop


class RankChannel:
    """Broadcasts from rank 0 over the default process group (gloo, nccl or hccl)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()

    def _broadcast_bytes(self, payload: bytes) -> bytes:
        import torch
        import torch.distributed as dist

        from ..parallel.groups import broadcast_int, comm_device

        length = broadcast_int(len(payload), src=0)
        device = comm_device()
        box = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if self.rank == 0
               else torch.empty(length, dtype=torch.uint8, device=device))
        dist.broadcast(box, src=0)
        return payload if self.rank == 0 else box.cpu().numpy().tobytes()

    def announce(self, message: RankMessage) -> None:
        """Rank 0: send `message` to every other rank."""
        self._broadcast_bytes(pickle.dumps(message))

    def receive(self) -> RankMessage:
        """Ranks > 0: wait for rank 0's next message (rank 0 wrote it; nothing from a request is
        unpickled anywhere else)."""
        return pickle.loads(self._broadcast_bytes(b""))

    def decide_stop(self, stop: bool) -> bool:
        from ..parallel.groups import broadcast_int

        return bool(broadcast_int(int(stop), src=0))


def generate_on_every_rank(engine, channel, opts, image, job_id: str, *, wants_stop=lambda: False,
                           on_step=None):
    """`engine.generate` with a stop decision shared at every step boundary; raises
    `GenerationCancelled` on every rank after the same step when rank 0 decides to stop."""
    steps = opts.steps

    def step_done(info, latent) -> None:
        if on_step is not None:
            on_step(info)
        if channel.decide_stop(wants_stop()):
            say(f"job {job_id}: stopped after step {info.index + 1}/{steps} (rank {channel.rank})")
            raise GenerationCancelled(f"stopped after step {info.index + 1}/{steps}")

    return engine.generate(image, opts, on_step=step_done)


def follow(engine, channel: RankChannel) -> None:
    """The loop of ranks > 0: run every job rank 0 announces until it says stop. A job's
    failure ends that job only (rank 0 sees the same failure at the same step)."""
    # torchrun forwards SIGTERM (a terminal's Ctrl-C reaches every rank too): these ranks follow
    # rank 0's stop decision instead, so no collective is left half-paired
    from .. import interrupts

    interrupts.uninstall()  # not the CLI's watchdog either: rank 0 decides when this rank stops
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    while True:
        message = channel.receive()
        if message.kind == STOP:
            return
        if message.kind != JOB:
            continue
        try:
            generate_on_every_rank(engine, channel, message.opts, message.image, message.job_id)
        except GenerationCancelled:
            pass
        except Exception as exc:  # the job failed here as on rank 0; keep serving
            say(f"job {message.job_id} failed on rank {channel.rank}: {type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:200]}")


def say(message: str) -> None:
    print(f"wanengine serve: {message}", file=sys.stderr, flush=True)
