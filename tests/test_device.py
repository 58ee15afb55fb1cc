"""Device selection and the Ascend runtime set-up (through a stand-in torch_npu module)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from wanengine import device as device_mod
from wanengine.errors import ConfigError


def test_cpu_is_chosen_without_accelerators():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert device_mod.resolve_device(None).type == "cpu"
    with pytest.raises(ConfigError, match="^device: cuda: CUDA is not available"):
        device_mod.resolve_device("cuda")
    with pytest.raises(ConfigError, match="^device: npu: no Ascend NPU"):
        device_mod.resolve_device("npu")


def test_ascend_runtime_settings(monkeypatch):
    calls = {}
    fake = types.ModuleType("torch_npu")
    fake.npu = types.SimpleNamespace(set_compile_mode=lambda **kw: calls.update(kw))
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(config=types.SimpleNamespace(allow_internal_format=True)),
                        raising=False)
    for key in device_mod.ASCEND_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")  # a user's own value wins
    device_mod.prepare_device(types.SimpleNamespace(type="npu"))  # torch.device("npu") needs real torch_npu
    assert calls == {"jit_compile": False}
    assert torch.npu.config.allow_internal_format is False
    import os

    assert os.environ["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert os.environ["TASK_QUEUE_ENABLE"] == "1"
