"""`wanengine serve` refuses at submission what its loaded engine would refuse only when the
job runs -- a request whose step count is not the one the server's mag-cache table was
recorded for (`--step-cache mag`), and under CFG parallel a request with guidance off on every
step -- with a 422 and one line naming the request field, before any job is queued.

Through the HTTP routes in process (fastapi's TestClient) on a real engine built from the
golden checkpoint with a mag table; a job with the table's step count still runs to the end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from _serve_helpers import TINY, b64, png_bytes
from wanengine.config import EngineConfig
from wanengine.errors import ConfigError

pytest.importorskip("fastapi", reason="wanengine serve needs the [serve] extra")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")


def _table(path: Path, steps: int) -> Path:
    ratios = [None] + [1.0] * (steps - 1)
    path.write_text(json.dumps({"format": "wanengine-mag-cache-table", "version": 1, "steps": steps, "ratios": {
        e: {"cond": ratios, "uncond": ratios} for e in ("high_noise_model", "low_noise_model")}}))
    return path


def _client(engine, out_dir: Path):
    from fastapi.testclient import TestClient

    from wanengine.serve.app import create_app
    from wanengine.serve.service import Service, ServiceSettings

    out_dir.mkdir()  # `wanengine serve` makes it before the service starts
    service = Service(engine, ServiceSettings(output_dir=out_dir))
    return TestClient(create_app(service)), service


def _wait(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/videos/{job_id}").json()
        if view["status"] in ("completed", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_a_step_count_other_than_the_mag_tables_is_refused_at_submission(golden_ckpt, tmp_path):
    from wanengine.engine import Engine

    table = _table(tmp_path / "mag.json", steps=2)
    engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False,
                                 step_cache="mag", cache_threshold=0.1, cache_table=str(table)))
    image = b64(png_bytes())
    client, service = _client(engine, tmp_path / "jobs")
    with client:
        for fields, field in (({"sample_steps": 3}, "sample_steps"),
                              ({"sample_solver": "euler", "denoising_steps": [1000, 750, 500]}, "denoising_steps")):
            refused = client.post("/v1/videos", json={**TINY, **fields, "image": image})
            assert refused.status_code == 422, refused.text
            assert refused.json() == {"error": f"{field}: 3 steps, but this server's mag-cache table (--cache-table) "
                                               "was recorded for 2; send 2 steps"}
        assert client.get("/v1/videos").json()["data"] == []  # nothing was queued
        assert service.metrics.rejected["invalid"] == 2 and service.metrics.accepted == 0
        assert str(table) not in refused.text  # the server's paths stay on the server

        accepted = client.post("/v1/videos", json={**TINY, "sample_steps": 2, "image": image})
        assert accepted.status_code == 202, accepted.text
        done = _wait(client, accepted.json()["id"])
        assert done["status"] == "completed" and done["progress"]["step"] == 2, done


class FakeCfgParallelEngine:
    """The one method the submission check asks of a CFG-parallel engine (`ParallelEngine.check_guidance`)."""

    device = torch.device("cpu")

    def check_guidance(self, unconditional: bool) -> None:
        if not unconditional:
            raise ConfigError("--cfg-size 2: guidance is off on every step")


def test_guidance_off_under_cfg_parallel_is_refused_at_submission(tmp_path):
    from PIL import Image

    from wanengine.serve.submission import RequestError, build_submission, check_for_engine

    fields = {"prompt": "p", "image": Image.new("RGB", (64, 48)), "max_area": 1024, "frame_num": 1, "sample_steps": 4}
    engine = FakeCfgParallelEngine()
    check_for_engine(build_submission({**fields, "guide_scale": 3.5}, decode=lambda i: i).opts, engine)
    check_for_engine(build_submission({**fields, "guide_scale": [1.0, 3.5]}, decode=lambda i: i).opts, engine)
    with pytest.raises(RequestError) as refused:
        check_for_engine(build_submission({**fields, "guide_scale": 1.0}, decode=lambda i: i).opts, engine)
    assert refused.value.status == 422
    assert refused.value.message.startswith("guide_scale: [1.0, 1.0] turns guidance off on every step, but this "
                                            "server splits the two guidance branches over its ranks (--cfg-size 2)")
