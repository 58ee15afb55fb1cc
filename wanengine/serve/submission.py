"""A `POST /v1/videos` body -> a validated `Submission`, or a `RequestError` with its HTTP status.

The options go through the CLI's own validation (`GenerationOptions.validate`, `latent_grid`,
`open_image`); its one-line messages name CLI flags, and the request's fields are named after
them, so `--frame-num` becomes `frame_num`. Statuses: 400 a malformed body (not JSON / multipart,
unknown or missing field, an image that is not base64 or not an image, a path or URL instead
of an image), 422 a well-formed value the validation refuses, 413 a body over the upload
limit or an image over the pixel limit (checked from the header, before decoding).
`check_for_engine` adds, at submission, what the loaded engine would refuse only when the job
runs (a mag-cache table's step count, CFG parallel with guidance off): 422 too.

The server never reads a path or URL named in a request: the image travels in the request.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from ..config import GenerationOptions, latent_grid
from ..errors import UserInputError

OUTPUT_FORMATS = ("mp4", "safetensors")
MAX_IMAGE_PIXELS = 40_000_000  # 8K UHD is 33 MP; a larger header is treated as a decompression bomb
MAX_SEED = 2**63 - 1  # seeds travel between ranks as int64

# request field -> (GenerationOptions field, JSON types accepted, converter for multipart strings)
_NUMBER = (int, float)
OPTION_FIELDS: Dict[str, tuple] = {
    "prompt": ("prompt", (str,), str),
    "negative_prompt": ("negative_prompt", (str, type(None)), str),
    "size": ("size", (str, type(None)), str),
    "max_area": ("max_area", (int, type(None)), int),
    "frame_num": ("frame_num", (int,), int),
    "sample_steps": ("steps", (int,), int),
    "sample_shift": ("shift", _NUMBER, float),
    "sample_solver": ("solver", (str,), str),
    "guide_scale": ("guide_scale", (int, float, str, list), str),
    "seed": ("seed", (int,), int),
}
REQUIRED = ("prompt", "image")
REQUEST_FIELDS = {target: name for name, (target, _, _) in OPTION_FIELDS.items()}  # options field -> request field


def passthrough_fields() -> tuple:
    """`GenerationOptions` fields without an entry above (options added by other features, e.g.
    Euler's `denoising_steps`): accepted under their own names, checked by the options' own
    validation, multipart strings passed as they are."""
    from dataclasses import fields as dataclass_fields

    mapped = {target for target, _, _ in OPTION_FIELDS.values()}
    return tuple(f.name for f in dataclass_fields(GenerationOptions) if f.name not in mapped)


FIELDS = ("image", "output_format", *OPTION_FIELDS, *passthrough_fields())


class RequestError(Exception):
    """A refused request: `status` (4xx) and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Submission:
    """What a job runs: validated options (seed drawn if it was negative), the decoded RGB image
    and the output format."""

    opts: GenerationOptions
    image: Any  # PIL.Image.Image, RGB, fully decoded
    output_format: str
    frame_size: tuple  # (width, height) of the video


def field_message(error: Exception) -> str:
    """The error's one line with the argument spelled as the request field: an
    `InvalidArgument` names the options' field (`steps: x` -> `sample_steps: x`); other messages
    name CLI flags (`prompt (--prompt): x` -> `prompt: x`, `--frame-num: x` -> `frame_num: x`)."""
    argument = getattr(error, "argument", None)
    if argument is not None and getattr(error, "detail", None) is not None:
        return f"{REQUEST_FIELDS.get(argument, argument)}: {error.detail}"
    message = str(error)
    message = re.sub(r"\b(\w+) \(--[a-z0-9-]+\)", r"\1", message)
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def parse_json_body(body: bytes) -> Dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body: must be a JSON object of fields")
    return data


def check_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"{unknown[0]}: unknown field; accepted: {', '.join(FIELDS)}")
    for name in REQUIRED:
        if fields.get(name) in (None, ""):
            raise RequestError(400, f"{name}: required")


def _typed(name: str, value: Any, from_form: bool) -> Any:
    """A field's value in the type GenerationOptions expects; multipart values are strings."""
    _, types, convert = OPTION_FIELDS[name]
    if from_form and isinstance(value, str) and str not in types:
        try:
            return convert(value.strip())
        except ValueError:
            raise RequestError(422, f"{name}: {value!r} is not {_kind(types)}") from None
    if isinstance(value, bool) or not isinstance(value, types):
        raise RequestError(422, f"{name}: {value!r} is not {_kind(types)}")
    if name == "guide_scale" and isinstance(value, list):
        if not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in value):
            raise RequestError(422, f"guide_scale: {value!r} is not a number or a [low, high] pair of numbers")
    return value


def _kind(types: tuple) -> str:
    if int in types and float in types:
        return "a number"
    return "an integer" if int in types else "a string"


def decode_image(value: Any, max_pixels: int = MAX_IMAGE_PIXELS):
    """Base64 text, a `data:image/...;base64,` URL or uploaded bytes -> an RGB PIL image with its
    EXIF orientation applied (by the CLI's `open_image`). The pixel count is checked from the
    header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    from ..io.image import open_image

    data = value if isinstance(value, bytes) else _base64_image(value)
    if not data:
        raise RequestError(400, "image: empty")
    try:
        handle = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image: {str(exc)[:150]}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, f"image: not a readable image ({type(exc).__name__}: {str(exc)[:100]})") from None
    width, height = handle.size
    if width * height > max_pixels:
        raise RequestError(413, f"image: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}")
    try:
        return open_image(data)  # the library's bounded decoder, EXIF orientation included
    except UserInputError as exc:
        raise RequestError(400, field_message(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, f"image: not a readable image ({type(exc).__name__}: {str(exc)[:100]})") from None


def _base64_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "image: must be base64 text or a data: URL")
    text = value.strip()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) or text.startswith(("/", "./", "../", "~", "file:")):
        raise RequestError(400, "image: give the image itself (base64 or a data: URL); "
                                "the server never reads paths or URLs")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, "image: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image: not valid base64") from None


def build_submission(fields: Mapping[str, Any], *, from_form: bool = False,
                     decode: Callable[[Any], Any] = decode_image,
                     draw_seed: Callable[[], int] = lambda: random.randint(0, 2**31 - 1)) -> Submission:
    """Validate every field (the CLI's checks), decode the image, draw the seed if negative."""
    check_fields(fields)
    kwargs = {OPTION_FIELDS[name][0]: _typed(name, value, from_form)
              for name, value in fields.items() if name in OPTION_FIELDS and value is not None}
    kwargs.update({name: value for name, value in fields.items() if name in passthrough_fields() and value is not None})
    if isinstance(kwargs.get("guide_scale"), list):
        kwargs["guide_scale"] = tuple(kwargs["guide_scale"])
    output_format = fields.get("output_format") or "mp4"
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(422, f"output_format: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if abs(kwargs.get("seed", -1)) > MAX_SEED:
        raise RequestError(422, f"seed: must be below 2**63, got {kwargs['seed']}")
    try:
        opts = GenerationOptions(**kwargs).validate()
    except UserInputError as exc:
        raise RequestError(422, field_message(exc)) from None
    except (TypeError, ValueError) as exc:  # a passthrough field of a type its validation did not expect
        raise RequestError(422, f"options: {type(exc).__name__}: {str(exc)[:150]}") from None
    image = decode(fields["image"])
    try:
        _, lat_h, lat_w = latent_grid(image.height, image.width, opts.resolved_max_area, opts.frame_num)
    except UserInputError as exc:
        raise RequestError(422, field_message(exc)) from None
    if opts.seed < 0:  # drawn now so the job record shows the seed it runs with
        opts = opts.with_seed(draw_seed())
    return Submission(opts=opts, image=image, output_format=output_format, frame_size=(8 * lat_w, 8 * lat_h))


def check_for_engine(opts: GenerationOptions, engine: Any) -> None:
    """What the loaded engine would refuse only once the job runs, refused now (422, naming the
    request field) so that no job is queued to fail: a step count other than the one this
    server's mag-cache table was recorded for (`--step-cache mag`), and -- under CFG parallel --
    a request whose steps never run the unconditional branch (guide scale 1.0 throughout).
    The server's own paths are not named (the table is `--cache-table`)."""
    table = getattr(getattr(engine, "step_cache", None), "table", None)
    if table is not None and opts.steps != table.steps:
        field = "denoising_steps" if opts.denoising_steps is not None else "sample_steps"
        raise RequestError(422, f"{field}: {opts.steps} steps, but this server's mag-cache table (--cache-table) "
                                f"was recorded for {table.steps}; send {table.steps} steps")
    from ..errors import ConfigError
    from ..pipeline import runs_unconditional

    check_guidance = getattr(engine, "check_guidance", None)
    if check_guidance is not None:
        try:
            check_guidance(runs_unconditional(opts))
        except ConfigError:
            raise RequestError(422, f"guide_scale: {list(opts.guidance)} turns guidance off on every step, but this "
                                    "server splits the two guidance branches over its ranks (--cfg-size 2); send "
                                    "a scale other than 1.0") from None


def submission_from_body(body: bytes, content_type: Optional[str], form: Optional[Mapping[str, Any]] = None,
                         max_pixels: int = MAX_IMAGE_PIXELS) -> Submission:
    """JSON bodies are parsed here; multipart bodies arrive parsed as `form` (field -> str, or
    bytes for the uploaded image file)."""
    decode = lambda value: decode_image(value, max_pixels)  # noqa: E731
    if form is not None:
        return build_submission(form, from_form=True, decode=decode)
    if content_type and not content_type.split(";")[0].strip().lower().endswith("json"):
        raise RequestError(400, f"body: send application/json or multipart/form-data, not {content_type!r}")
    return build_submission(parse_json_body(body), decode=decode)
