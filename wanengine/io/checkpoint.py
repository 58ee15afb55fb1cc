"""Checkpoint discovery and preflight: where every component comes from, in any layout, and
is each one complete and consistent?

Three ways to point at weights (spec `checkpoint.md`, `formats.md`):
- `--ckpt-dir` with the released layout (`high_noise_model/`, `low_noise_model/`,
  `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`, `google/umt5-xxl/spiece.model`);
- `--ckpt-dir` with a diffusers repository (`model_index.json`; `transformer/` = high-noise
  expert, `transformer_2/` = low-noise, `vae/`, `text_encoder/`, `tokenizer/`);
- one option per component (`--high-noise-model --low-noise-model --t5 --vae --tokenizer`),
  each a file or a directory in any known naming, with or without `--ckpt-dir`; an option
  beats the directory's component (the preflight notes it, shown at `--verbose`).

Everything here reads only directory listings, JSON files, safetensors headers and
memory-mapped pickles -- never weights -- so it takes well under a second even on the 14B
release and catches missing, truncated or inconsistent files, and tensors missing from or
mis-shaped in any component, before minutes of loading.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import CLI_WORDS, CheckpointError, CheckpointSourceError

if TYPE_CHECKING:  # pragma: no cover
    from ..models.dit import DiTConfig

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SPM_FILE = "spiece.model"
EXPERTS = ("high_noise_model", "low_noise_model")
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
MODEL_INDEX = "model_index.json"
COMPONENTS = (*EXPERTS, "t5", "vae", "tokenizer")

# Where each component sits in the two directory layouts.
RELEASED_PATHS: Dict[str, str] = {"high_noise_model": "high_noise_model", "low_noise_model": "low_noise_model",
                                  "t5": T5_FILE, "vae": VAE_FILE, "tokenizer": f"{TOKENIZER_DIR}/{SPM_FILE}"}
DIFFUSERS_PATHS: Dict[str, str] = {"high_noise_model": "transformer", "low_noise_model": "transformer_2",
                                   "t5": "text_encoder", "vae": "vae", "tokenizer": f"tokenizer/{SPM_FILE}"}
WHAT: Dict[str, str] = {"high_noise_model": "high-noise expert", "low_noise_model": "low-noise expert",
                        "t5": "text encoder", "vae": "VAE", "tokenizer": "tokenizer"}


def _shown(component: str, path: str) -> str:
    """A layout entry as listed in messages: directories end with "/"."""
    return path + ("/" if component in EXPERTS or (component in ("t5", "vae") and "." not in path) else "")


def _needs(paths: Mapping[str, str]) -> str:
    return ", ".join(_shown(c, p) for c, p in paths.items())


LAYOUT_HINT = (f"the released layout needs {_needs(RELEASED_PATHS)}; a diffusers repository needs "
               f"{MODEL_INDEX}, {_needs(DIFFUSERS_PATHS)}")


@dataclass(frozen=True)
class Component:
    """One component's source: its path, the argument it came from (`ckpt_dir` or the
    component's own, e.g. `vae`), the directory's layout when from `ckpt_dir`, and the layout
    found at the path."""

    path: Path
    argument: str
    layout: str = ""
    within: str = ""  # "released layout" / "diffusers repository" when it came from ckpt_dir

    @property
    def origin(self) -> str:
        """Where it came from, in the CLI's words (`info`): `--ckpt-dir (released layout)`, `--vae`."""
        flag = CLI_WORDS.name(self.argument)
        return f"{flag} ({self.within})" if self.within else flag


@dataclass(frozen=True)
class CheckpointLayout:
    """Every component's source, checked by `preflight_checkpoint`.

    `root`/`kind`: the `--ckpt-dir` and its layout ("released" or "diffusers"), if given;
    `notes`: overrides that beat a directory's component (shown at --verbose);
    `dit_configs`: each expert's configuration (from config.json, --dit-config or shapes);
    `expert_shapes`: each expert's tensor names and shapes in the model's naming (8-bit scales
    set aside), what adapters are planned against -- both filled by `preflight_checkpoint`."""

    root: Optional[Path]
    kind: Optional[str]
    components: Dict[str, Component]
    dit_config: Optional[Path] = None
    dit_configs: Dict[str, "DiTConfig"] = field(default_factory=dict)
    expert_shapes: Dict[str, Dict[str, Tuple[int, ...]]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()

    @property
    def t5(self) -> Path:
        return self.components["t5"].path

    @property
    def vae(self) -> Path:
        return self.components["vae"].path

    @property
    def tokenizer(self) -> Path:
        """The sentencepiece model file."""
        return self.components["tokenizer"].path

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer.parent

    def expert(self, name: str) -> Path:
        return self.components[name].path


def check_torch_zip(path: Path) -> None:
    """A torch.save file is a zip archive; reading its central directory catches truncation."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {exc}") from None


def _tokenizer_file(path: Path, argument: str) -> Path:
    """A tokenizer source is `spiece.model` itself or a directory holding it."""
    if path.is_dir():
        if not (path / SPM_FILE).is_file():
            raise CheckpointSourceError(argument, f"{path}: no {SPM_FILE} in this directory")
        return path / SPM_FILE
    return path


def _found(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    return shown or "nothing (empty directory)"


def resolve_sources(ckpt_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                    overrides: Optional[Mapping[str, Optional[Union[str, "os.PathLike[str]"]]]] = None,
                    dit_config: Optional[Union[str, "os.PathLike[str]"]] = None) -> CheckpointLayout:
    """Which path each component comes from (no file is opened): the overrides, else the
    `ckpt_dir` in its detected layout. One `CheckpointSourceError` (an `InvalidArgument` naming
    the argument) lists every missing component."""
    given = {name: Path(p) for name, p in (overrides or {}).items() if p}
    unknown = sorted(set(given) - set(COMPONENTS))
    if unknown:
        raise CheckpointError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
    for name, path in given.items():
        if not path.exists():
            raise CheckpointSourceError(name, f"{path}: not found")
    if dit_config is not None and not Path(dit_config).is_file():
        raise CheckpointSourceError("dit_config", f"{dit_config}: file not found")
    root = Path(ckpt_dir) if ckpt_dir else None
    components: Dict[str, Component] = {}
    notes: List[str] = []
    kind = None
    if root is not None:
        if not root.is_dir():
            raise CheckpointSourceError("ckpt_dir", f"{root}: directory not found")
        kind = "diffusers" if (root / MODEL_INDEX).is_file() else "released"
        paths = DIFFUSERS_PATHS if kind == "diffusers" else RELEASED_PATHS
        described = "diffusers repository" if kind == "diffusers" else "released layout"
        missing = []
        for name in COMPONENTS:
            candidate = root / paths[name]
            present = candidate.exists()
            if name in given:
                if present:
                    notes.append(f"{CLI_WORDS.name(name)} {given[name]} is used instead of {candidate} ({described})")
                continue
            if present:
                components[name] = Component(candidate, "ckpt_dir", within=described)
            else:
                missing.append(f"{_shown(name, paths[name])} ({WHAT[name]})")
        if missing:
            absent = [n for n in COMPONENTS if n not in given and n not in components]
            found = _found(root)
            raise CheckpointSourceError.for_argument("ckpt_dir", lambda words: (
                f"{root} ({described}): missing {', '.join(missing)}; found {found}; {LAYOUT_HINT} "
                f"(or give {' or '.join(words.name(n) for n in absent)})"))
    else:
        lacking = [n for n in COMPONENTS if n not in given]
        if lacking:
            raise CheckpointSourceError.for_argument("ckpt_dir", lambda words: (
                f"not given, and no {', '.join(words.name(n) for n in lacking)}: every component needs its "
                "own source when no checkpoint directory is given"))
    for name, path in given.items():
        components[name] = Component(path, name)
    tokenizer = components["tokenizer"]
    components["tokenizer"] = replace(tokenizer, path=_tokenizer_file(tokenizer.path, tokenizer.argument))
    return CheckpointLayout(root, kind, {n: components[n] for n in COMPONENTS},
                            Path(dit_config) if dit_config else None, notes=tuple(notes))


def _inspect(layout: CheckpointLayout) -> CheckpointLayout:
    """Open every component from headers and check it against its model; fill in layouts."""
    from ..models.vae import open_vae
    # names, shapes, index and shards from headers only -- and the 8-bit layout, if any
    from ..quant.loading import inspect_expert_8bit, open_t5

    components = dict(layout.components)
    configs, shapes = {}, {}
    for name in EXPERTS:
        part = components[name]
        plan = inspect_expert_8bit(part.path, config_file=layout.dit_config).plan
        configs[name] = plan.config
        shapes[name] = {record.name: tuple(record.shape) for record in plan.records}
        components[name] = replace(part, layout=plan.layout)
    for name, opener in (("t5", open_t5), ("vae", open_vae)):
        part = components[name]
        if part.path.is_file() and part.path.suffix in (".pth", ".pt"):
            check_torch_zip(part.path)  # a clear message for a truncated zip before unpickling
        _, tensors, _ = opener(part.path)
        components[name] = replace(part, layout=tensors.layout)
    part = components["tokenizer"]
    if not part.path.is_file():
        raise CheckpointError(f"{part.path}: tokenizer not found (a {SPM_FILE} file or a directory holding one)")
    components["tokenizer"] = replace(part, layout="sentencepiece model")
    return CheckpointLayout(layout.root, layout.kind, components, layout.dit_config, dit_configs=configs,
                            expert_shapes=shapes, notes=layout.notes)


def preflight_checkpoint(ckpt_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                         overrides: Optional[Mapping[str, Optional[Union[str, "os.PathLike[str]"]]]] = None,
                         dit_config: Optional[Union[str, "os.PathLike[str]"]] = None) -> CheckpointLayout:
    """Resolve every component (`resolve_sources`) and check each one without reading weights;
    one CheckpointError naming the file (or the missing components) for the first problem."""
    return _inspect(resolve_sources(ckpt_dir, overrides, dit_config))
