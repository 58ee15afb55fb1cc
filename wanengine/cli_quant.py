"""The command-line options of 8-bit weights, shared by `i2v`, `convert` and `plan`:
`--quantize` (experts) and `--quantize-t5` (text encoder), each "int8" or "fp8"."""
from __future__ import annotations

import typer

PANEL = "8-bit weights"


def quantize_option(help_text: str = "int8 or fp8: quantize the experts' block linears while loading "
                                     "(published 8-bit experts load as they are without it)."):
    return typer.Option(None, "--quantize", rich_help_panel=PANEL, help=help_text)


def quantize_t5_option(help_text: str = "int8 or fp8: the same for the text encoder."):
    return typer.Option(None, "--quantize-t5", rich_help_panel=PANEL, help=help_text)
