"""`wanengine demo`: the whole pipeline on a small random-weight checkpoint, with no downloads.

The checkpoint is written once, in the released layout (tokenizer, UMT5 `.pth` in bf16, two
sharded DiT experts with index + config.json, VAE `.pth`), into a cache directory, so the
demo exercises exactly the loading code a real checkpoint goes through.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch

if TYPE_CHECKING:
    from PIL import Image

DEMO_VERSION = "v1"
DEMO_PROMPT = "A sunny beach at noon, gentle waves rolling in, a small boat drifting on the sea."
DEMO_SETTINGS = dict(max_area=160 * 128, frame_num=9, steps=6, shift=5.0, solver="unipc", guide_scale=(3.5, 3.5))
# Small but complete sizes; the DiT text width is fixed at 4096 by the architecture.
T5_SIZES = dict(dim=4096, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32)
DIT_SIZES = dict(dim=128, ffn_dim=256, freq_dim=256, in_dim=36, out_dim=16, num_heads=2, num_layers=2,
                 text_len=512, eps=1e-6)
VAE_BASE_WIDTH = 16


def default_cache_dir() -> Path:
    base = os.environ.get("WANENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wanengine")
    return Path(base)


def _train_tokenizer(out_dir: Path) -> None:
    """A tiny sentencepiece model with the released special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    corpus = [DEMO_PROMPT, "the quick brown fox jumps over the lazy dog", "a cat wearing sunglasses on a surfboard",
              "summer beach vacation style, waves, sky, sun, sand, boat, water, clouds, light, motion",
              "a city street at night with neon signs, rain and reflections", "mountains, forest, river, snow"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(out_dir / "spiece"),
                                   vocab_size=160, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    (out_dir / "spiece.vocab").unlink(missing_ok=True)


def _save_sharded(state: Dict[str, torch.Tensor], expert_dir: Path, config: dict, shards: int) -> None:
    from safetensors.torch import save_file

    expert_dir.mkdir(parents=True)
    (expert_dir / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config, "model_type": "i2v"},
                                                       indent=2))
    names = list(state)
    weight_map, total = {}, 0
    for index in range(shards):
        file_name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[index::shards]}
        save_file(part, str(expert_dir / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (expert_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))


def write_random_checkpoint(target: Path, seed: int = 0, *, t5_sizes: Optional[Dict] = None,
                            dit_sizes: Optional[Dict] = None, vae_base_width: int = VAE_BASE_WIDTH) -> Path:
    """Write a random-weight checkpoint in the released layout to `target`, once: a complete
    checkpoint already there is returned as it is. Built in a staging directory, fsynced,
    preflighted and renamed into place under a lock (`demo_cache.cached_directory`), so
    concurrent callers all get a whole checkpoint and none deletes another's.

    Sizes default to the demo's (`T5_SIZES`, `DIT_SIZES`, `VAE_BASE_WIDTH`); benchmarks pass
    larger ones (`t5_sizes` are `T5Config` fields except the vocabulary, `dit_sizes` the
    expert's `config.json` values)."""
    from .demo_cache import cached_directory

    def build(staging: Path) -> None:
        _write_checkpoint_files(staging, seed, dict(T5_SIZES if t5_sizes is None else t5_sizes),
                                dict(DIT_SIZES if dit_sizes is None else dit_sizes), vae_base_width)

    return cached_directory(Path(target), build, verify_checkpoint,
                            legacy_staging=(".demo-" + "?" * 8,))  # v0.1's tempfile.mkdtemp(prefix=".demo-")


def verify_checkpoint(root: Path) -> None:
    """Complete = the marker written last is there and the whole layout passes the preflight."""
    from .errors import CheckpointError
    from .io.checkpoint import preflight_checkpoint

    if not (root / "configuration.json").is_file():
        raise CheckpointError(f"{root}: incomplete (no configuration.json)")
    preflight_checkpoint(root)


def _write_checkpoint_files(staging: Path, seed: int, t5_sizes: Dict, dit_sizes: Dict, vae_base_width: int) -> None:
    from .models.dit import DiTConfig, WanDiT
    from .models.t5 import T5Config, UMT5Encoder
    from .models.vae import VAEConfig, WanVAE

    torch.manual_seed(seed)
    tok_dir = staging / "google" / "umt5-xxl"
    tok_dir.mkdir(parents=True)
    _train_tokenizer(tok_dir)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model")).get_piece_size()
    t5 = UMT5Encoder(T5Config(vocab_size=vocab, **t5_sizes))
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, staging / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = WanVAE(VAEConfig(dim=vae_base_width))
    torch.save(vae.state_dict(), staging / "Wan2.1_VAE.pth")
    for name, dtype, shards in (("high_noise_model", torch.bfloat16, 3), ("low_noise_model", torch.float32, 2)):
        dit = WanDiT(DiTConfig(**dit_sizes))
        _save_sharded({k: v.to(dtype) for k, v in dit.state_dict().items()}, staging / name, dit_sizes, shards)
    # written last: its presence marks a complete checkpoint
    (staging / "configuration.json").write_text(json.dumps({"framework": "Pytorch", "task": "image-to-video"}))


def demo_checkpoint(cache_dir: Optional[Path] = None) -> Path:
    """The cached demo checkpoint, written on first use (safe when demos run concurrently)."""
    from .demo_cache import check_cache_dir

    root = check_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return write_random_checkpoint(root / f"demo-ckpt-{DEMO_VERSION}")


def demo_image(width: int = 320, height: int = 256):
    """A synthetic beach scene: sky gradient, sun, sea and sand."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.55)
    for row in range(height):
        if row < horizon:
            shade = row / horizon
            colour = (int(90 + 100 * shade), int(150 + 70 * shade), 235)
        elif row < int(height * 0.8):
            colour = (20, int(90 + 60 * (row - horizon) / height), 160)
        else:
            colour = (225, 200, 150)
        draw.line([(0, row), (width, row)], fill=colour)
    draw.ellipse([width * 0.7, height * 0.08, width * 0.85, height * 0.27], fill=(255, 230, 120))
    draw.polygon([(width * 0.3, horizon + 18), (width * 0.45, horizon + 18), (width * 0.42, horizon + 28),
                  (width * 0.33, horizon + 28)], fill=(120, 60, 30))
    return image


def run_demo(out: Path, *, cache_dir: Optional[Path] = None, seed: int = 42,
             say: Callable[[str], None] = print, progress: bool = True, device: Optional[str] = None,
             dtype: Optional[str] = None, timings: Optional[Dict[str, float]] = None) -> Path:
    """Write (once) the demo checkpoint, run the full pipeline on `device` (default: the best
    available, as `i2v`) in `dtype` (default: float32 on the CPU, bfloat16 on an accelerator)
    and write `out`, the input image beside it (`<stem>_input.png`) and a side-by-side
    preview (`<stem>_preview.png`: input | first frame | last frame). `timings`: stages before
    this call (the CLI's start-up and import), the first rows of the stage table."""
    from dataclasses import replace

    from .clock import process_age
    from .config import EngineConfig
    from .device import resolve_device
    from .engine import Engine
    from .io.output_paths import check_output_file, check_run_outputs
    from .io.video import check_output_path
    from .stage_log import StageLog
    from .timing import StageTimer

    out = check_output_path(out, "out")
    # the PNGs written beside it obey the same rules, checked before any work too
    input_path, preview_path = (check_output_file(path, "out", extensions=(".png",)) for path in companion_paths(out))
    resolved = resolve_device(device)
    dtype = dtype or ("float32" if resolved.type == "cpu" else "bfloat16")
    cfg = EngineConfig(ckpt_dir=".", device=str(resolved), dtype=dtype, progress=progress).validate()
    timer = StageTimer(log=StageLog(enabled=progress))
    for name, seconds in (timings or {"start-up": process_age()}).items():
        timer.add(name, seconds)
    from .demo_cache import check_cache_dir

    check_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())  # exit 2 before any stage
    with timer.stage("prepare checkpoint"):
        ckpt = demo_checkpoint(cache_dir)
    say(f"demo checkpoint: {ckpt}")
    check_run_outputs({"out": out}, ckpt_dir=ckpt)  # the PNGs share its directory
    engine = Engine(replace(cfg, ckpt_dir=str(ckpt)))
    for name, seconds in engine.load_timer.seconds.items():
        timer.add(name, seconds)
    image = demo_image()
    video = engine.i2v(image, DEMO_PROMPT, seed=seed, **DEMO_SETTINGS)
    for name, seconds in video.metadata["timings_s"].items():
        if name != "load":
            timer.add(name, seconds)
    with timer.stage("write", f"{out} and its input and preview PNGs"):
        video.save(out)
        save_png(image, input_path)
        save_png(side_by_side(image, video), preview_path)
    width, height = video.size
    say(f"wrote {out}: {video.num_frames} frames of {width}x{height} at {video.fps} fps on {engine.device} "
        f"({dtype}, kernels {engine.kernel_backend}), seed {video.seed}; input {input_path.name}, "
        f"preview {preview_path.name}")
    if progress:
        say(timer.table(wall=process_age()))
    return out


def companion_paths(out: Path) -> Tuple[Path, Path]:
    """Where the demo puts the input image and the preview next to `out`."""
    return out.with_name(f"{out.stem}_input.png"), out.with_name(f"{out.stem}_preview.png")


def side_by_side(image, video) -> "Image.Image":
    """input | first frame | last frame, each at the video's frame size, 4 px white gaps,
    scaled up 2x (nearest) when the frames are small."""
    from PIL import Image

    width, height = video.size
    frames = video.to_pil()
    panels = [image.convert("RGB").resize((width, height), Image.BICUBIC), frames[0], frames[-1]]
    gap = 4
    sheet = Image.new("RGB", (3 * width + 2 * gap, height), (255, 255, 255))
    for index, panel in enumerate(panels):
        sheet.paste(panel, (index * (width + gap), 0))
    if height < 256:
        sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
    return sheet


def save_png(image, path: Path) -> None:
    from .io.video import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
