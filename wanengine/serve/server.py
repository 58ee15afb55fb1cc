"""`wanengine serve` end to end: preflight (no weights read), load the engine once, then serve
HTTP with uvicorn on rank 0 while the other ranks of a torchrun job follow (`ranks.follow`).

Shutdown (SIGTERM / Ctrl-C): uvicorn stops accepting connections, the app's lifespan stops the
service (the running job stops at its next step boundary and is marked failed with the
reason, queued jobs are failed, the other ranks are told to stop), and the process exits 0.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator, List

from ..config import EngineConfig
from ..errors import ConfigError, UserInputError
from .service import ServiceSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserInputError(f"wanengine serve needs the [serve] extra ({', '.join(missing)} missing): "
                             "pip install 'wanengine[serve]'")


def preflight_engine(cfg: EngineConfig):
    """The CLI's engine checks: options, checkpoint layout, parallel layout, adapters; no weights
    read. Returns the checked checkpoint layout (for `load_engine`)."""
    from ..io.checkpoint import EXPERTS, preflight_checkpoint
    from ..run import check_parallel_layout

    cfg.validate()
    layout = preflight_checkpoint(cfg.ckpt_dir, cfg.component_overrides(), cfg.dit_config)
    check_parallel_layout(cfg, layout.dit_configs[EXPERTS[0]].num_heads)
    from ..adapters.plan import plan_checkpoint_adapters

    plan_checkpoint_adapters(cfg.loras, layout)  # every adapter against the experts' shapes, headers only
    return layout


def check_settings(settings: ServiceSettings, host: str, port: int) -> None:
    if not host:
        raise ConfigError("--host: empty")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: {port} is not a port number (0-65535; 0 picks a free one)")
    if settings.max_queue < 1:
        raise ConfigError(f"--max-queue: must be >= 1, got {settings.max_queue}")
    if not settings.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb: must be positive, got {settings.max_upload_mb}")
    if settings.job_ttl_s < 0:
        raise ConfigError(f"--job-ttl: must be >= 0 seconds (0 keeps jobs forever), got {settings.job_ttl_s}")
    if settings.api_key is not None and not settings.api_key.strip():
        raise ConfigError("--api-key: empty")
    out = settings.output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir: {out} is not a directory")
    if not out.exists():
        if not out.parent.is_dir():
            raise ConfigError(f"--output-dir: {out}: directory {out.parent} does not exist")
        out.mkdir()
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir: {out} is not writable")


def check_port_free(host: str, port: int) -> None:
    """Bind once before loading tens of GB, so a taken port is a one-line error, not a late one."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


@contextlib.contextmanager
def output_dir_lock(directory: Path) -> Iterator[None]:
    """One service per output directory: two would overwrite each other's records."""
    import fcntl

    handle = open(directory / ".wanengine-serve.lock", "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"--output-dir: {directory} is in use by another wanengine serve") from None
        yield
    finally:
        handle.close()


def serve(cfg: EngineConfig, settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000,
          say: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)) -> None:
    """Validate, load the engine once, serve until SIGTERM / Ctrl-C."""
    from ..parallel import is_writer

    check_serve_extra()
    layout = preflight_engine(cfg)
    writer = is_writer()
    if writer:  # the other ranks neither bind nor write
        check_settings(settings, host, port)
        check_port_free(host, port)
        if host not in LOOPBACK and not settings.api_key:
            say(f"warning: --host {host} without --api-key: anyone who can reach this port can submit jobs")
    with (output_dir_lock(settings.output_dir) if writer else contextlib.nullcontext()):
        engine = load_engine(cfg, layout)
        if writer:
            say(f"engine: device {engine.device}, dtype {cfg.dtype}, kernels {engine.kernel_backend}, "
                f"loaded in {engine.load_timer.total:.1f} s")
        if not cfg.distributed:
            return run_http(engine, settings, host, port, channel=None)
        from .ranks import RankChannel, follow

        channel = RankChannel()
        if channel.rank != 0:
            return follow(engine, channel)
        return run_http(engine, settings, host, port, channel=channel)


def load_engine(cfg: EngineConfig, layout=None):
    from dataclasses import replace

    from ..engine import Engine
    from ..parallel import make_engine

    cfg = replace(cfg, progress=False)  # no progress bars in a server; progress is in the job records
    return make_engine(cfg, layout) if cfg.distributed else Engine(cfg, layout=layout)


def run_http(engine, settings: ServiceSettings, host: str, port: int, channel) -> None:
    import uvicorn

    from .app import create_app
    from .service import Service

    service = Service(engine, settings, channel)
    signals: List[str] = []

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.servers:
                bound = self.servers[0].sockets[0].getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                print(f"listening on http://{shown}:{bound}", flush=True)

        def handle_exit(self, sig: int, frame) -> None:
            signals.append(signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    app = create_app(service, shutdown_reason=lambda: signals[0] if signals else "shutdown")
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                   lifespan="on", timeout_graceful_shutdown=5))
    # The service handles its own signals from here on: the CLI's one-signal path (its handlers,
    # wakeup fd and watchdog, which would count uvicorn's re-raised signal as a second one and
    # exit mid-shutdown) steps aside.
    from .. import interrupts

    interrupts.uninstall()
    # uvicorn re-raises the signal it caught once it has shut down; these handlers absorb it
    # so the process ends normally (exit 0) after the records are saved.
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.stop(signals[0] if signals else "shutdown")
