"""Options, sizes and guidance parsing: the pipeline's sizing rule and clear one-line errors."""
from __future__ import annotations

import pytest

from wanengine.config import EngineConfig, GenerationOptions, latent_grid, parse_guide_scale, parse_size
from wanengine.constants import constants
from wanengine.errors import ConfigError


@pytest.mark.parametrize("image_hw, max_area, expected", [
    ((720, 1280), 921600, (21, 90, 160)),      # the spec's 1280x720 example
    ((1280, 720), 921600, (21, 160, 90)),      # portrait twin
    # An exactly 832x480 image gives 58 latent rows, not 60: sqrt(399360 * 480/832) is
    # 479.99999999999994 in float64 and the reference floors it. We keep that for parity.
    ((480, 832), 399360, (21, 58, 104)),
    ((481, 832), 399360, (21, 60, 102)),
    ((120, 160), 12288, (21, 12, 16)),         # the golden case's geometry (at 81 frames)
])
def test_latent_grid_follows_spec(image_hw, max_area, expected):
    assert latent_grid(*image_hw, max_area, 81) == expected


def test_token_counts_of_reference_sizes():
    frames, lat_h, lat_w = latent_grid(720, 1280, 921600, 81)
    assert frames * (lat_h // 2) * (lat_w // 2) == 75600


def test_too_small_area_is_a_clear_error():
    with pytest.raises(ConfigError, match="^max_area: 10 is too small"):
        latent_grid(120, 160, 10, 5)


def test_parse_size_and_guidance():
    assert parse_size("1280*720") == (1280, 720)
    assert parse_size("832x480") == (832, 480)
    with pytest.raises(ConfigError, match="^size: 'big'"):
        parse_size("big")
    assert parse_guide_scale(5) == (5.0, 5.0)
    assert parse_guide_scale("3,4") == (3.0, 4.0)
    assert parse_guide_scale((1.5, 2.5)) == (1.5, 2.5)
    for bad in ("nan", "1,2,3", "x"):
        with pytest.raises(ConfigError, match="^guide_scale: "):
            parse_guide_scale(bad)


def test_options_defaults_are_the_reference_ones():
    opts = GenerationOptions(prompt="p").validate()
    assert (opts.frame_num, opts.steps, opts.shift, opts.solver) == (81, 40, 5.0, "unipc")
    assert opts.resolved_max_area == 921600
    assert opts.resolved_negative_prompt == constants()["negative_prompt_default"]
    assert GenerationOptions(prompt="p", negative_prompt="").resolved_negative_prompt == constants()["negative_prompt_default"]
    assert GenerationOptions(prompt="p", size="832*480").resolved_max_area == 399360
    assert GenerationOptions(prompt="p", size="832*480", max_area=1000).resolved_max_area == 1000


@pytest.mark.parametrize("field, value, flag", [
    ("frame_num", 80, "--frame-num"), ("frame_num", 0, "--frame-num"), ("steps", 0, "--sample-steps"),
    ("shift", 0.0, "--sample-shift"), ("shift", float("inf"), "--sample-shift"), ("solver", "heun", "--sample-solver"),
    ("max_area", -5, "--max-area"), ("size", "12", "--size"), ("guide_scale", "inf", "--guide-scale"),
])
def test_bad_options_name_their_argument_and_the_cli_its_flag(field, value, flag):
    """The library names the argument (a ValueError subclass); the CLI prints the flag instead."""
    from wanengine.cli import user_message
    from wanengine.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        GenerationOptions(prompt="p", **{field: value}).validate()
    error = info.value
    assert isinstance(error, ValueError) and error.argument == field
    assert str(error).startswith(f"{field}: ") and "--" not in str(error) and "\n" not in str(error)
    assert user_message(error) == f"{flag}: {error.detail}"


@pytest.mark.parametrize("field, value", [("dtype", "fp8"), ("kernel_backend", "tpu"), ("device", "gpu"),
                                          ("cfg_size", 3), ("ulysses_size", 0)])
def test_bad_engine_config(field, value):
    with pytest.raises(ConfigError):
        EngineConfig(ckpt_dir="x", **{field: value}).validate()


def test_an_error_naming_several_arguments_has_a_cli_wording():
    import pickle

    from wanengine.cli import user_message
    from wanengine.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        EngineConfig(ckpt_dir=None, t5="t5.safetensors").validate()
    error = info.value
    assert str(error).startswith("ckpt_dir: ") and "--" not in str(error) and "high_noise_model" in str(error)
    assert user_message(error).startswith("--ckpt-dir: ") and "--high-noise-model" in user_message(error)
    assert "--t5," not in user_message(error)  # the one that was given is not asked for
    assert user_message(pickle.loads(pickle.dumps(error))) == user_message(error)
