"""Prompt tokenizer: exact ids and masks on every golden case, and clear loader errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wanengine.errors import CheckpointError
from wanengine.models.tokenizer import EOS_ID, TEXT_LEN, Tokenizer, clean_prompt, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(golden_ckpt: Path) -> Tokenizer:
    return load_tokenizer(golden_ckpt)


@pytest.fixture(scope="module")
def cases(golden: Path) -> list:
    return json.loads((golden / "tokenizer_cases.json").read_text(encoding="utf-8"))


def test_every_golden_case_is_exact(tokenizer: Tokenizer, cases: list) -> None:
    assert len(cases) >= 7
    for case in cases:
        ids, mask = tokenizer([case["text"]])
        assert ids.dtype == mask.dtype == torch.int64
        assert ids.shape == mask.shape == (1, TEXT_LEN)
        assert ids[0].tolist() == case["ids"], f"ids differ for {case['text'][:40]!r}"
        assert mask[0].tolist() == case["mask"], f"mask differs for {case['text'][:40]!r}"


def test_batch_equals_single_rows(tokenizer: Tokenizer, cases: list) -> None:
    ids, mask = tokenizer([c["text"] for c in cases])
    assert ids.shape == (len(cases), TEXT_LEN)
    assert ids.tolist() == [c["ids"] for c in cases]
    assert mask.tolist() == [c["mask"] for c in cases]


def test_plain_string_is_a_batch_of_one(tokenizer: Tokenizer, cases: list) -> None:
    ids, mask = tokenizer(cases[0]["text"])
    assert ids.shape == (1, TEXT_LEN) and ids[0].tolist() == cases[0]["ids"]


def test_empty_prompt_is_eos_only(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer([""])
    assert ids[0, 0].item() == EOS_ID and ids[0, 1:].eq(0).all()
    assert mask[0, 0].item() == 1 and mask[0, 1:].eq(0).all()


def test_long_prompt_truncates_to_511_pieces_plus_eos(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer(["word " * 2000])
    assert mask.sum().item() == TEXT_LEN
    assert ids[0, -1].item() == EOS_ID and (ids[0, :-1] != EOS_ID).all()


def test_cleaning_rules() -> None:
    assert clean_prompt("  a\t\tb\n\n c  ") == "a b c"
    assert clean_prompt("&amp;lt;b&amp;gt;") == "<b>"  # unescaped twice
    assert clean_prompt("ＡＢＣ") == "ABC"  # ftfy default folds full-width forms


def test_text_len_attribute(golden_ckpt: Path) -> None:
    short = load_tokenizer(golden_ckpt, text_len=8)
    assert short.text_len == 8
    ids, mask = short(["long " * 50])
    assert ids.shape == (1, 8) and mask.sum().item() == 8 and ids[0, -1].item() == EOS_ID


def test_missing_spiece_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"google/umt5-xxl/spiece\.model"):
        load_tokenizer(tmp_path)


def test_corrupt_spiece_model_names_the_file(tmp_path: Path, golden_ckpt: Path) -> None:
    folder = tmp_path / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    source = golden_ckpt / "google" / "umt5-xxl" / "spiece.model"
    (folder / "spiece.model").write_bytes(source.read_bytes()[:1000])  # truncated protobuf
    with pytest.raises(CheckpointError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)


def test_copied_checkpoint_dir_loads(tmp_path: Path, golden_ckpt: Path) -> None:
    shutil.copytree(golden_ckpt / "google", tmp_path / "google")
    assert load_tokenizer(tmp_path)(["猫"])[1].sum().item() == 3
