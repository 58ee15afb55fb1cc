"""Request fields -> options without a server: CLI messages spelled as fields, and options that
other features add to `GenerationOptions` accepted under their own names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
from PIL import Image

from wanengine.config import GenerationOptions
from wanengine.errors import ConfigError
from wanengine.serve import submission
from wanengine.serve.submission import RequestError, build_submission, field_message


def test_cli_messages_name_the_request_fields():
    assert field_message("--frame-num: 6 is not of the form 4n+1") == "frame_num: 6 is not of the form 4n+1"
    assert field_message("prompt (--prompt): must be a string") == "prompt: must be a string"
    assert field_message("--sample-steps: must be >= 1") == "sample_steps: must be >= 1"
    assert field_message("--guide-scale: bad") == "guide_scale: bad"


@dataclass(frozen=True)
class OptionsWithAnExtra(GenerationOptions):
    flavour: Optional[str] = None

    def validate(self) -> "OptionsWithAnExtra":
        if self.flavour not in (None, "sweet"):
            raise ConfigError(f"--flavour: {self.flavour!r} is not sweet")
        return super().validate()


def test_options_added_by_other_features_pass_through_to_their_validation(monkeypatch):
    monkeypatch.setattr(submission, "GenerationOptions", OptionsWithAnExtra)
    monkeypatch.setattr(submission, "FIELDS", ("image", "output_format", *submission.OPTION_FIELDS,
                                               *submission.passthrough_fields()))
    fields = {"prompt": "p", "image": Image.new("RGB", (64, 48)), "max_area": 1024, "frame_num": 1}
    accepted = build_submission({**fields, "flavour": "sweet"}, decode=lambda image: image)
    assert accepted.opts.flavour == "sweet"
    with pytest.raises(RequestError) as refused:
        build_submission({**fields, "flavour": "sour"}, decode=lambda image: image)
    assert refused.value.status == 422 and refused.value.message == "flavour: 'sour' is not sweet"
