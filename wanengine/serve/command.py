"""The `wanengine serve` command: its options (the checkpoint / engine options of `i2v`, plus
the service's) and the call into `server.serve`. Registered on the CLI's app in `wanengine/cli.py`;
this module imports only typer, so `wanengine --help` works without the `[serve]` extra.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..cli_quant import quantize_option, quantize_t5_option
from ..cli_runtime_options import (cache_max_skips_option, cache_table_option, cache_threshold_option,
                                   cache_warmup_option, lora_high_option, lora_low_option, lora_option,
                                   runtime_fields, step_cache_option)
from ..cli_weights import (ckpt_dir_option, dit_config_option, high_noise_option, low_noise_option, t5_option,
                           tokenizer_option, vae_option, weight_sources)

# The i2v command's panel names for the options it shares; the service's own panel.
INPUTS = "Inputs"
PERFORMANCE = "Performance / memory"
PARALLEL = "Parallel (torchrun)"
SERVICE = "Service"
ADAPTERS = "Adapters and step cache"


def serve(
    ckpt_dir: Optional[Path] = ckpt_dir_option(INPUTS),
    device: Optional[str] = typer.Option(None, "--device", rich_help_panel=PERFORMANCE, show_default="npu > cuda > cpu",
                                         help="cpu, cuda[:N] or npu[:N]."),
    dtype: str = typer.Option("bfloat16", "--dtype", rich_help_panel=PERFORMANCE,
                              help="float32, bfloat16 or float16 (DiT and T5)."),
    kernel_backend: str = typer.Option("auto", "--kernel-backend", rich_help_panel=PERFORMANCE,
                                       help="auto (WANENGINE_KERNEL_BACKEND if set, else by device), reference, "
                                            "torch (alias cuda) or npu."),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model", metavar="",
                                                 rich_help_panel=PERFORMANCE,
                                                 show_default="on for an accelerator, off on CPU",
                                                 help="Keep only the active expert on the device."),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", metavar="", rich_help_panel=PERFORMANCE,
                                help="Run the text encoder on the CPU."),
    vae_tile_rows: Optional[int] = typer.Option(None, "--vae-tile-rows", rich_help_panel=PERFORMANCE,
                                                show_default="untiled", help="Decode in exact bands of N latent rows."),
    ulysses_size: int = typer.Option(1, "--ulysses-size", rich_help_panel=PARALLEL, help="Sequence-parallel degree."),
    cfg_size: int = typer.Option(1, "--cfg-size", rich_help_panel=PARALLEL,
                                 help="2: the guidance branches on two groups of cards."),
    dit_fsdp: bool = typer.Option(False, "--dit-fsdp", metavar="", rich_help_panel=PARALLEL,
                                  help="Shard the DiT experts (FSDP)."),
    t5_fsdp: bool = typer.Option(False, "--t5-fsdp", metavar="", rich_help_panel=PARALLEL,
                                 help="Shard the text encoder (FSDP)."),
    vae_parallel: bool = typer.Option(False, "--vae-parallel", metavar="", rich_help_panel=PARALLEL,
                                      help="Split the VAE over the ranks."),
    host: str = typer.Option("127.0.0.1", "--host", rich_help_panel=SERVICE,
                             help="Address to listen on (loopback by default; 0.0.0.0 exposes the service: "
                                  "set --api-key then)."),
    port: int = typer.Option(8000, "--port", rich_help_panel=SERVICE, help="TCP port (0 picks a free one)."),
    output_dir: Path = typer.Option(Path("wanengine-jobs"), "--output-dir", rich_help_panel=SERVICE,
                                    help="Where videos and job records (JSON) are kept; a restarted service "
                                         "lists the finished jobs found there."),
    max_queue: int = typer.Option(8, "--max-queue", rich_help_panel=SERVICE,
                                  help="Most jobs waiting to run; more submissions get 429."),
    max_upload_mb: float = typer.Option(32.0, "--max-upload-mb", rich_help_panel=SERVICE,
                                        help="Largest request body in MB, checked before anything is decoded "
                                             "(a base64 image is 4/3 of its file size)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="WANENGINE_API_KEY", show_default=False,
                                          rich_help_panel=SERVICE,
                                          help="Require 'Authorization: Bearer KEY' on every route but /healthz."),
    job_ttl: float = typer.Option(86400.0, "--job-ttl", rich_help_panel=SERVICE,
                                  help="Seconds a finished job (record and file) is kept; 0 keeps it forever."),
    high_noise_model: Optional[Path] = high_noise_option(),
    low_noise_model: Optional[Path] = low_noise_option(),
    t5: Optional[Path] = t5_option(),
    vae: Optional[Path] = vae_option(),
    tokenizer: Optional[Path] = tokenizer_option(),
    dit_config: Optional[Path] = dit_config_option(),
    quantize: Optional[str] = quantize_option(),
    quantize_t5: Optional[str] = quantize_t5_option(),
    lora: Optional[List[str]] = lora_option(ADAPTERS),
    lora_high: Optional[List[str]] = lora_high_option(ADAPTERS),
    lora_low: Optional[List[str]] = lora_low_option(ADAPTERS),
    step_cache: str = step_cache_option(ADAPTERS),
    cache_threshold: Optional[float] = cache_threshold_option(ADAPTERS),
    cache_warmup: int = cache_warmup_option(ADAPTERS),
    cache_max_skips: Optional[int] = cache_max_skips_option(ADAPTERS),
    cache_table: Optional[Path] = cache_table_option(ADAPTERS),
) -> None:
    """Serve image-to-video over HTTP (POST /v1/videos, then poll and fetch); loads the engine once.

    Under torchrun, rank 0 serves and every rank runs each job. Needs FastAPI and uvicorn (the serve extra).
    """
    from ..cli import say  # honours --quiet / --verbose
    from ..config import EngineConfig
    from .server import serve as run_server
    from .service import ServiceSettings

    sources = weight_sources(ckpt_dir, high_noise_model, low_noise_model, t5, vae, tokenizer, dit_config)
    cfg = EngineConfig(**sources, device=device, dtype=dtype, kernel_backend=kernel_backend,
                       offload_model=offload_model, t5_cpu=t5_cpu, vae_tile_rows=vae_tile_rows,
                       ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp,
                       vae_parallel=vae_parallel, progress=False, quantize=quantize, quantize_t5=quantize_t5,
                       **runtime_fields(lora, lora_high, lora_low, step_cache, cache_threshold, cache_warmup,
                                        cache_max_skips, cache_table))
    settings = ServiceSettings(output_dir=output_dir, max_queue=max_queue, max_upload_mb=max_upload_mb,
                               job_ttl_s=job_ttl, api_key=api_key)
    run_server(cfg, settings, host=host, port=port, say=say)
