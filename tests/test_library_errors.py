"""Errors the library raises are worded for the library: a `ValueError` subclass whose message
names the argument as the Python caller wrote it (`ckpt_dir`, `cfg_size=2`), never a CLI flag;
the CLI prints the same error in flag words (`--ckpt-dir`, `--cfg-size 2`). Covers the
checkpoint preflight, output paths, parallel layout checks, step-cache, 8-bit, adapter, preset
and sampler options, and the bounded decoding of image bytes."""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wanengine.cli import user_message
from wanengine.errors import CheckpointError, CheckpointSourceError, ConfigError, InvalidArgument, UserInputError

PACKAGE = Path(__file__).resolve().parents[1] / "wanengine"
# Modules that implement a CLI command: their messages are about that command's flags.
COMMAND_MODULES = {"cli.py", "cli_argv.py", "run.py", "plan.py", "demo.py", "cache/command.py", "io/convert.py",
                   "serve/server.py", "serve/command.py"}


def library_and_cli_words(error: UserInputError, argument: str = None):
    """The error's two wordings, after checking the library one names no flag and survives pickling."""
    library, cli = str(error), user_message(error)
    assert isinstance(error, ValueError), type(error)
    prose = re.sub(r"`[^`]*`", "", library)  # a command line quoted in backticks may spell its flags
    assert not re.search(r"(^|[\s(])--[a-z]", prose), library
    assert "\n" not in library and "\n" not in cli
    if argument is not None:
        assert getattr(error, "argument", None) == argument and library.startswith(f"{argument}: ")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), user_message(copy)) == (library, cli)
    return library, cli


def test_library_modules_raise_no_flag_worded_errors():
    """A guard: outside the command modules, no raise spells a flag as the message's subject."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        if name in COMMAND_MODULES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"Error\(f?[\"']--[a-z]", line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- checkpoint sources


def test_checkpoint_directory_not_found(tmp_path):
    from wanengine import Engine, EngineConfig

    with pytest.raises(CheckpointSourceError) as info:
        Engine(EngineConfig(ckpt_dir=str(tmp_path / "nope"), device="cpu", dtype="float32", progress=False))
    assert isinstance(info.value, CheckpointError)
    library, cli = library_and_cli_words(info.value, "ckpt_dir")
    assert library.endswith("nope: directory not found") and cli == "--" + library.replace("ckpt_dir", "ckpt-dir", 1)


def test_incomplete_checkpoint_names_the_other_sources_in_each_wording(tmp_path):
    from wanengine.io.checkpoint import resolve_sources

    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(CheckpointSourceError) as info:
        resolve_sources(tmp_path, {"vae": __file__})
    library, cli = library_and_cli_words(info.value, "ckpt_dir")
    assert "(or give low_noise_model or t5 or tokenizer)" in library
    assert cli.startswith("--ckpt-dir: ") and "(or give --low-noise-model or --t5 or --tokenizer)" in cli


@pytest.mark.parametrize("overrides, dit_config, argument", [
    ({"vae": "/no/such/vae.pth"}, None, "vae"),
    ({"low_noise_model": "/no/such/low"}, None, "low_noise_model"),
    ({}, "/no/such/config.json", "dit_config"),
])
def test_a_missing_component_source_names_its_argument(tmp_path, overrides, dit_config, argument):
    from wanengine.io.checkpoint import resolve_sources

    with pytest.raises(CheckpointSourceError) as info:
        resolve_sources(tmp_path, overrides, dit_config)
    _, cli = library_and_cli_words(info.value, argument)
    assert cli.startswith("--" + argument.replace("_", "-") + ": ")


def test_no_source_at_all():
    from wanengine.io.checkpoint import resolve_sources

    with pytest.raises(CheckpointSourceError) as info:
        resolve_sources(None, {"t5": __file__})
    library, cli = library_and_cli_words(info.value, "ckpt_dir")
    assert "no high_noise_model, low_noise_model, vae, tokenizer" in library
    assert "no --high-noise-model, --low-noise-model, --vae, --tokenizer" in cli


def test_single_file_expert_hint_names_dit_config_in_each_wording():
    from wanengine.io.formats.dit_single import infer_dit_config

    with pytest.raises(CheckpointError) as info:
        infer_dit_config({}, "expert.safetensors")
    assert "as dit_config" in str(info.value) and "as --dit-config" in user_message(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


# ---------------------------------------------------------------- outputs


@pytest.fixture()
def video():
    import torch

    from wanengine.io.video import Video

    return Video(tensor=torch.zeros(3, 1, 8, 8), latent=torch.zeros(16, 1, 1, 1))


@pytest.mark.parametrize("name, fragment", [("x.gif", "unsupported extension '.gif'"),
                                            ("nope/x.mp4", "does not exist"), ("d.mp4", "not a regular file")])
def test_video_save_names_path_and_the_cli_out(video, tmp_path, name, fragment):
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(InvalidArgument) as info:
        video.save(tmp_path / name)
    library, cli = library_and_cli_words(info.value, "path")
    assert fragment in library and cli.startswith("--out: ")


def test_outputs_clashing_with_inputs(tmp_path):
    from wanengine.io.output_paths import check_run_outputs

    image = tmp_path / "in.png"
    image.write_bytes(b"x")
    with pytest.raises(InvalidArgument) as info:
        check_run_outputs({"out": image}, image=image)
    library, cli = library_and_cli_words(info.value, "out")
    assert "is the input image (image)" in library and "is the input image (--image)" in cli
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(InvalidArgument) as info:
        check_run_outputs({"out": tmp_path / "o.mp4", "metrics_json": ckpt / "m.json"}, ckpt_dir=ckpt)
    library, cli = library_and_cli_words(info.value, "metrics_json")
    assert "(ckpt_dir)" in library and cli.startswith("--metrics-json: ") and "(--ckpt-dir)" in cli


# ---------------------------------------------------------------- parallel layout


def test_world_size_mismatch_is_worded_both_ways(monkeypatch):
    from wanengine.parallel.groups import init_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as info:
        init_parallel(2, 2)
    library, cli = library_and_cli_words(info.value)
    assert library.startswith("cfg_size=2 x ulysses_size=2 = 4 ranks, but the job has 1")
    assert cli.startswith("--cfg-size 2 x --ulysses-size 2 = 4 ranks, but the job has 1")


def test_parallel_engine_refuses_fsdp_with_offload_before_joining_a_group(golden_ckpt):
    from wanengine import EngineConfig
    from wanengine.parallel.engine import ParallelEngine, nothing_to_split

    with pytest.raises(ConfigError) as info:
        ParallelEngine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dit_fsdp=True, offload_model=True))
    library, cli = library_and_cli_words(info.value)
    assert library.startswith("dit_fsdp=True with offload_model=True: ") and library.endswith("drop offload_model")
    assert cli.startswith("--dit-fsdp with --offload-model: ") and cli.endswith("drop --offload-model")
    library, cli = library_and_cli_words(nothing_to_split(), "cfg_size")
    assert library.endswith("use ulysses_size instead") and cli.endswith("use --ulysses-size instead")


# ---------------------------------------------------------------- options


def test_step_cache_options(tmp_path):
    from wanengine import EngineConfig

    with pytest.raises(InvalidArgument) as info:
        EngineConfig(ckpt_dir="x", cache_threshold=0.1).validate()
    library, cli = library_and_cli_words(info.value, "cache_threshold")
    assert "set step_cache='first-block' or step_cache='mag'" in library
    assert "set --step-cache first-block or --step-cache mag" in cli
    with pytest.raises(InvalidArgument) as info:
        EngineConfig(ckpt_dir="x", step_cache="first-block", cache_threshold=0.1, cfg_batch=False).validate()
    library, cli = library_and_cli_words(info.value, "step_cache")
    assert library.endswith("(cfg_size=2); drop cfg_batch=False") and cli.endswith("(--cfg-size 2); drop --no-cfg-batch")


def test_mag_table_errors_name_cache_table(tmp_path):
    from wanengine.cache.table import MagTable, empty_ratios, load_table

    with pytest.raises(InvalidArgument) as info:
        load_table(tmp_path / "none.json")
    library_and_cli_words(info.value, "cache_table")
    with pytest.raises(InvalidArgument) as info:
        MagTable(4, empty_ratios(4), {}, "t.json").check_steps(40)
    library, cli = library_and_cli_words(info.value, "cache_table")
    assert "this run has 40 (steps)" in library and "this run has 40 (--sample-steps)" in cli


def test_quantize_kernel_preset_lora_and_sampler_arguments():
    from wanengine.adapters.spec import LoraSpec, lora_specs_from_flags
    from wanengine.kernels.dispatch import requested_backend
    from wanengine.presets import preset_values
    from wanengine.quant.schemes import resolve_quant_dtype
    from wanengine.schedulers.euler import euler_schedule

    cases = [(lambda: resolve_quant_dtype("int4", "quantize_t5"), "quantize_t5", "--quantize-t5: "),
             (lambda: requested_backend("tpu"), "kernel_backend", "--kernel-backend: "),
             (lambda: preset_values("fastest"), "preset", "--preset: "),
             (lambda: LoraSpec("a.safetensors", expert="middle").validate(), "loras", "--loras: "),
             (lambda: lora_specs_from_flags(high=["a.safetensors:inf"]), "lora_high", "--lora-high: "),
             (lambda: euler_schedule(3, 5.0, step_list=[1000, 500]), "denoising_steps", "--denoising-steps: ")]
    for call, argument, flag in cases:
        with pytest.raises(InvalidArgument) as info:
            call()
        _, cli = library_and_cli_words(info.value, argument)
        assert cli.startswith(flag), cli
    assert "but steps is 3" in str(info.value) and "but --sample-steps is 3" in user_message(info.value)


# ---------------------------------------------------------------- image bytes: the bounded decoder


def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_bytes_and_streams_are_reduced_like_files(tmp_path, monkeypatch):
    import wanengine.io.image as image_module

    encoded = _png(64, 48)
    path = tmp_path / "big.png"
    path.write_bytes(encoded)
    monkeypatch.setattr(image_module, "REDUCE_ABOVE_PIXELS", 64 * 48 // 4)  # "very large" for this test
    from_path = image_module.open_image(path)
    assert from_path.size == (32, 24)
    for value in (encoded, bytearray(encoded), memoryview(encoded), io.BytesIO(encoded)):
        got = image_module.open_image(value)
        assert got.size == (32, 24) and np.array_equal(np.asarray(got), np.asarray(from_path))


def test_image_bytes_above_the_bomb_limit_are_refused(monkeypatch):
    from wanengine.io.image import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # bomb limit 200 pixels < 64 x 48
    with pytest.raises(InvalidArgument) as info:
        open_image(_png(64, 48))
    library, cli = library_and_cli_words(info.value, "image")
    assert library.startswith("image: the bytes given: too many pixels to decode safely")
    assert cli.startswith("--image: the bytes given: ")


def test_frame_size_bound_holds_for_every_caller_of_latent_grid():
    """The bound lives in `latent_grid`, so the library, serve and the CLI all meet it."""
    from wanengine.config import latent_grid

    with pytest.raises(InvalidArgument) as info:
        latent_grid(720, 1280, 40000 * 22500, 1)
    library, cli = library_and_cli_words(info.value, "max_area")
    assert "at most 16384 pixels per side" in library and library.endswith("lower size/max_area)")
    assert cli.endswith("lower --size/--max-area)")
