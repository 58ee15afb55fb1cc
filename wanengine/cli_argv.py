"""Command-line rewriting done before typer parses anything (torch-free, microseconds).

It lets the official `generate.py` command lines run unchanged while the help shows one
spelling per option:

- the reference's snake_case spellings (`--ckpt_dir`, `--frame_num`, ...) become our
  kebab-case ones whenever the command has that option; renamed ones (`--base_seed`,
  `--save_file`, `--sample_guide_scale`) map through `RENAMED`; `--offload_model True|False`
  becomes `--offload-model` / `--no-offload-model`;
- flags of the reference's other tasks (speech-to-video, animate, prompt extension) are a
  one-line "not supported by this engine" error naming the flag;
- the global options (`--quiet/-q`, `--verbose/-v`, `--debug`, `--version`) may stand before or
  after the subcommand: they are moved in front of it;
- `plan` accepts any `i2v` command line: `i2v` options that `plan` has no use for are dropped
  with their values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

try:  # recent typer carries its own copy of click; older ones use the click package
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError  # type: ignore[no-redef]

GLOBAL_FLAGS = ("--quiet", "-q", "--verbose", "-v", "--debug", "--version")

# Reference spellings whose name differs from ours beyond "_" -> "-".
RENAMED: Dict[str, str] = {
    "--sample_guide_scale": "--guide-scale",
    "--base_seed": "--seed",
    "--save_file": "--out",
}

_PROMPT_EXTENSION = "prompt extension needs a separate language model; pass the extended prompt in --prompt"
# Official generate.py flags that do not apply to this engine, and why.
UNSUPPORTED: Dict[str, str] = {
    "--use_prompt_extend": _PROMPT_EXTENSION,
    "--prompt_extend_method": _PROMPT_EXTENSION,
    "--prompt_extend_model": _PROMPT_EXTENSION,
    "--prompt_extend_target_lang": _PROMPT_EXTENSION,
    **{flag: "it belongs to the s2v-14B (speech-to-video) task; this engine runs i2v-A14B"
       for flag in ("--num_clip", "--audio", "--enable_tts", "--tts_prompt_audio", "--tts_prompt_text",
                    "--tts_text", "--pose_video", "--start_from_ref", "--infer_frames")},
    **{flag: "it belongs to the animate-14B task; this engine runs i2v-A14B"
       for flag in ("--src_root_path", "--refert_num", "--replace_flag", "--use_relighting_lora")},
    "--ring_size": "ring attention is not implemented; use --ulysses-size (and --cfg-size) instead",
}

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ArgvError(UsageError):
    """A command line that cannot be rewritten (an unsupported official flag, a bad boolean)."""


def _option_table(command: Any) -> Dict[str, bool]:
    """Every option spelling of the (click) `command` -> whether it takes a value."""
    table: Dict[str, bool] = {}
    if command is None:
        return table
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            takes_value = not (param.is_flag or param.count)
            for name in (*param.opts, *param.secondary_opts):
                table[name] = takes_value
    return table


def _split(token: str) -> Tuple[str, Optional[str]]:
    name, eq, value = token.partition("=")
    return (name, value) if eq else (token, None)


def _translate(name: str, options: Dict[str, bool]) -> str:
    """Our spelling of the option `name` (unchanged when we do not know it)."""
    if name in options:
        return name
    if name in RENAMED:
        return RENAMED[name]
    kebab = name.replace("_", "-")
    return kebab if kebab in options else name


def normalize_argv(argv: Sequence[str], group: Any) -> List[str]:
    """Rewrite `argv` as described in the module docstring; raises `ArgvError`."""
    front: List[str] = []
    index = 0
    while index < len(argv) and argv[index].startswith("-"):  # options before the subcommand
        front.append(argv[index])
        index += 1
    if index == len(argv):
        return front
    name = argv[index]
    command = group.commands.get(name)
    options = _option_table(command)
    foreign = _option_table(group.commands.get("i2v")) if name == "plan" else {}
    moved: List[str] = []
    rest: List[str] = [name]
    index += 1
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--":
            rest.extend(argv[index - 1:])
            break
        if not token.startswith("-") or token == "-":
            rest.append(token)
            continue
        flag, inline = _split(token)
        if flag in UNSUPPORTED:
            raise ArgvError(f"{flag}: not supported by this engine ({UNSUPPORTED[flag]})")
        if flag in GLOBAL_FLAGS and flag not in options:
            if inline is not None:
                raise ArgvError(f"{flag}: takes no value")
            moved.append(flag)
            continue
        if flag == "--offload_model":  # the reference's str2bool option
            value = inline
            if value is None and index < len(argv) and argv[index].lower() in _BOOL_WORDS:
                value, index = argv[index], index + 1
            if value is not None and value.lower() not in _BOOL_WORDS:
                raise ArgvError(f"--offload_model: {value!r} is not True or False")
            rest.append("--no-offload-model" if value is not None and not _BOOL_WORDS[value.lower()]
                        else "--offload-model")
            continue
        ours = _translate(flag, options)
        if ours not in options and name == "plan":
            theirs = _translate(flag, foreign)
            if theirs in foreign:  # an i2v option plan does not need: drop it and its value
                if foreign[theirs] and inline is None:
                    index += 1
                continue
        rest.append(ours if inline is None else f"{ours}={inline}")
        if options.get(ours) and inline is None and index < len(argv):
            rest.append(argv[index])  # the option's value, verbatim (it may start with "-")
            index += 1
    return front + moved + rest
