"""The shared `.pth` reader: weights only, never arbitrary objects."""
from __future__ import annotations

import collections

import pytest
import torch

from wanengine.errors import CheckpointError
from wanengine.models.loading import load_pth_state_dict


class Payload:
    """Unpickling this would run code of the file's choosing; weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_arbitrary_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_pth_state_dict(path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_a_flat_dict_of_tensors_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save(collections.OrderedDict(a=torch.ones(3), b=torch.zeros(2, 2)), path)
    state = load_pth_state_dict(path)
    assert list(state) == ["a", "b"] and torch.equal(state["a"], torch.ones(3))
