"""`wanengine serve` through a real uvicorn subprocess on 127.0.0.1 (one server for the module,
the golden checkpoint in float32 on the CPU, an API key set): the golden case over HTTP equals
the library's output; lifecycle and progress; a full queue; cancelling queued and running jobs;
every validation the CLI has -> 4xx with one line and no job; 401; metrics; a failing job
fails alone; a soak of concurrent submissions with steady memory."""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from _serve_helpers import LONG, TINY, Server, b64, error_of, golden_request, png_bytes, rss_kib

pytest.importorskip("uvicorn", reason="wanengine serve needs the [serve] extra")
pytestmark = pytest.mark.slow

KEY = "test-key-0123"
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-out")


@pytest.fixture(scope="module")
def server(golden_ckpt, out_dir):
    srv = Server(["--ckpt-dir", str(golden_ckpt), "--device", "cpu", "--dtype", "float32", "--output-dir",
                  str(out_dir), "--max-queue", str(MAX_QUEUE), "--max-upload-mb", "1"], api_key=KEY)
    srv.start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes()


def test_golden_case_over_http_equals_the_library(server, golden, golden_ckpt, out_dir):
    from wanengine import Engine, EngineConfig

    fields = golden_request(golden)
    response = server.submit(fields, (golden / "input.png").read_bytes())
    assert response.status_code == 202, response.text
    job = server.wait(response.json()["id"])
    assert job["status"] == "completed", job
    content = server.request("GET", f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "application/octet-stream"
    got = load(content.content)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1): same summation order, no contention
    try:
        engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False))
        want = engine.i2v(golden / "input.png", fields["prompt"], max_area=fields["max_area"],
                          frame_num=fields["frame_num"], steps=fields["sample_steps"], shift=fields["sample_shift"],
                          solver=fields["sample_solver"], guide_scale=tuple(fields["guide_scale"]), seed=fields["seed"])
    finally:
        torch.set_num_threads(threads)
    assert got["video"].shape == want.tensor.shape
    assert float((got["video"] - want.tensor).abs().max()) <= 1e-6
    assert float((got["latent"] - want.latent).abs().max()) <= 1e-6
    assert job["seed"] == 1234 and job["progress"] == {"step": 6, "steps": 6, "stage": "completed"}


def test_lifecycle_full_queue_and_cancel(server, image, out_dir):
    long = server.submit(LONG, image)
    assert long.status_code == 202 and long.json()["status"] == "queued", long.text
    long_id = long.json()["id"]
    seen_long: list = []
    server.wait(long_id, ("in_progress",), seen=seen_long, min_step=2)
    assert seen_long[-1]["progress"]["steps"] == LONG["sample_steps"]
    assert seen_long[-1]["progress"]["stage"] == "denoise"

    waiting = []
    for index in range(MAX_QUEUE):  # the running job does not count: 8 may wait
        response = server.submit({**TINY, "sample_steps": 40 if index == 1 else 1, "seed": index}, image)
        assert response.status_code == 202, response.text
        waiting.append(response.json()["id"])
    before = {job["id"] for job in server.jobs()}
    full = server.submit(TINY, image)
    assert full.status_code == 429 and "queue full" in error_of(full)
    assert {job["id"] for job in server.jobs()} == before  # no job for the refused request

    dropped = server.request("DELETE", f"/v1/videos/{waiting[0]}")
    assert dropped.status_code == 200 and dropped.json()["status"] == "cancelled"
    assert server.request("GET", f"/v1/videos/{waiting[0]}/content").status_code == 404
    not_yet = server.request("GET", f"/v1/videos/{waiting[1]}/content")
    assert not_yet.status_code == 409 and "queued" in error_of(not_yet)

    stopping = server.request("DELETE", f"/v1/videos/{long_id}")
    assert stopping.status_code == 202 and stopping.json()["cancel_requested"] is True
    cancelled = server.wait(long_id)
    assert cancelled["status"] == "cancelled" and "stopped after step" in cancelled["error"]
    assert cancelled["progress"]["step"] < LONG["sample_steps"]
    assert server.request("GET", f"/v1/videos/{long_id}/content").status_code == 404
    assert [p.name for p in out_dir.glob(f"{long_id}.*")] == [f"{long_id}.json"]  # its record, no output

    seen: list = []
    done = server.wait(waiting[1], seen=seen)
    statuses = [view["status"] for view in seen]
    order = ["queued", "in_progress", "completed"]
    assert statuses == sorted(statuses, key=order.index) and done["status"] == "completed"
    steps = [view["progress"]["step"] for view in seen]
    assert steps == sorted(steps) and done["progress"]["step"] == done["progress"]["steps"] == 40
    for job_id in waiting[2:]:
        assert server.wait(job_id)["status"] == "completed"
    mp4 = server.request("GET", f"/v1/videos/{waiting[2]}/content")
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"

    deleted = server.request("DELETE", f"/v1/videos/{waiting[2]}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert server.request("GET", f"/v1/videos/{waiting[2]}").status_code == 404
    assert not list(out_dir.glob(f"{waiting[2]}*"))


def _bomb_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10000, 5000)).save(buffer, "PNG")  # 50 megapixels in a few kB
    return buffer.getvalue()


BAD_JSON = [  # (fields, status, what the one-line error must name)
    ({"frame_num": 6}, 422, "frame_num: 6 is not of the form 4n+1"),
    ({"sample_steps": 0}, 422, "sample_steps: must be >= 1"),
    ({"sample_shift": -1.0}, 422, "sample_shift: must be a positive number"),
    ({"sample_solver": "euler-a"}, 422, "sample_solver: unknown solver"),
    ({"guide_scale": [1, 2, 3]}, 422, "guide_scale: give one value or LOW,HIGH"),
    ({"guide_scale": "abc"}, 422, "guide_scale: 'abc' is not a number"),
    ({"guide_scale": float("inf")}, 422, "guide_scale: guidance must be finite"),
    ({"sample_shift": float("nan")}, 422, "sample_shift: must be a positive number"),
    ({"size": "big"}, 422, "size: 'big' is not of the form W*H"),
    ({"max_area": 0}, 422, "max_area: must be positive"),
    ({"max_area": 100}, 422, "max_area: 100 is too small"),
    ({"prompt": 3}, 422, "prompt: 3 is not a string"),
    ({"frame_num": "5"}, 422, "frame_num: '5' is not an integer"),
    ({"seed": True}, 422, "seed: True is not an integer"),
    ({"seed": 2**70}, 422, "seed: must be below 2**63"),
    ({"output_format": "gif"}, 422, "output_format: 'gif' is not one of mp4, safetensors"),
    ({"steps": 4}, 400, "steps: unknown field"),
    ({"prompt": None}, 400, "prompt: required"),
]


def test_bad_requests_are_refused_with_one_line_and_no_job(server, image, out_dir):
    files_before = sorted(p.name for p in out_dir.iterdir())
    jobs_before = server.jobs()
    for fields, status, message in BAD_JSON:
        body = json.dumps({**TINY, **fields, "image": b64(image)})  # Python's JSON: Infinity / NaN too
        response = server.request("POST", "/v1/videos", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, (fields, response.text)
        assert message in error_of(response), (fields, response.text)

    image_cases = [
        ({"image": "/etc/hostname"}, 400, "never reads paths or URLs"),
        ({"image": "http://example.com/cat.png"}, 400, "never reads paths or URLs"),
        ({"image": "not base64!"}, 400, "image: not valid base64"),
        ({"image": b64(b"definitely not an image")}, 400, "image: not a readable image"),
        ({"image": "data:image/png," + b64(image)}, 400, "must be base64-encoded"),
        ({"image": b64(_bomb_png())}, 413, "over the limit of 40000000"),
    ]
    for fields, status, message in image_cases:
        response = server.request("POST", "/v1/videos", json={**TINY, **fields})
        assert response.status_code == status, (fields, response.text)
        assert message in error_of(response), (fields, response.text)
    missing = server.request("POST", "/v1/videos", json=TINY)
    assert missing.status_code == 400 and "image: required" in error_of(missing)
    not_json = server.request("POST", "/v1/videos", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in error_of(not_json)
    too_big = server.request("POST", "/v1/videos", json={**TINY, "image": "A" * (3 * 2**20 // 2)})
    assert too_big.status_code == 413 and "--max-upload-mb" in error_of(too_big)

    form = {k: str(v) for k, v in TINY.items()}
    bad_form = server.request("POST", "/v1/videos", data={**form, "frame_num": "abc"}, files={"image": image})
    assert bad_form.status_code == 422 and "frame_num: 'abc' is not an integer" in error_of(bad_form)
    wrong_file = server.request("POST", "/v1/videos", data={"prompt": "p", "image": b64(image)},
                                files={"seed": image})
    assert wrong_file.status_code == 400 and "seed: only the image may be a file" in error_of(wrong_file)

    assert server.jobs() == jobs_before
    assert sorted(p.name for p in out_dir.iterdir()) == files_before


def test_multipart_with_an_image_file(server, image):
    form = {**{k: str(v) for k, v in TINY.items()}, "guide_scale": "3.0,4.5", "output_format": "safetensors"}
    response = server.request("POST", "/v1/videos", data=form, files={"image": ("in.png", image, "image/png")})
    assert response.status_code == 202, response.text
    job = server.wait(response.json()["id"])
    assert job["status"] == "completed" and job["settings"]["guide_scale"] == [3.0, 4.5] and job["size"] == "32x16"


def test_api_key_is_required_except_for_health(server):
    assert server.request("GET", "/v1/videos", key="").status_code == 401
    wrong = server.request("POST", "/v1/videos", key="test-key-0124", json=TINY)
    assert wrong.status_code == 401 and "API key" in error_of(wrong)
    assert server.request("GET", "/metrics", key="wrong").status_code == 401
    health = server.request("GET", "/healthz", key="")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_failing_job_fails_alone_and_metrics_count_it(server, image):
    nan = server.submit({**TINY, "sample_steps": 2, "guide_scale": 1e38}, image)  # overflows to Inf
    assert nan.status_code == 202, nan.text
    failed = server.wait(nan.json()["id"])
    assert failed["status"] == "failed" and "non-finite values" in failed["error"]
    after = server.submit(TINY, image)
    assert server.wait(after.json()["id"])["status"] == "completed"
    text = server.request("GET", "/metrics").text
    assert "wanengine_queue_depth 0" in text
    assert 'wanengine_jobs{status="failed"}' in text and 'wanengine_jobs{status="completed"}' in text
    assert 'wanengine_stage_seconds_total{stage="denoise"}' in text
    assert 'wanengine_submissions_rejected_total{reason="queue_full"}' in text
    count = [line for line in text.splitlines() if line.startswith("wanengine_step_seconds_count")]
    assert count and int(count[0].split()[1]) >= 1


def test_soak_of_concurrent_submissions_loses_nothing_and_memory_stays_steady(server, image):
    def submit(seed: int):
        return server.submit({**TINY, "seed": seed}, image)

    def soak(first_seed: int) -> tuple:
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(submit, range(first_seed, first_seed + 20)))
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        refused = [r for r in responses if r.status_code != 202]
        assert all(r.status_code == 429 and "queue full" in error_of(r) for r in refused)
        assert len(accepted) + len(refused) == 20 and len(accepted) >= MAX_QUEUE
        for job_id in accepted:
            assert server.wait(job_id)["status"] == "completed"
        listed = {job["id"]: job["status"] for job in server.jobs()}
        assert all(listed[job_id] == "completed" for job_id in accepted)  # none lost
        return accepted, rss_kib(server.pid())

    _, rss_warm = soak(1000)  # warms the allocator and every code path
    accepted, rss_after = soak(2000)
    assert rss_after - rss_warm < 64 * 1024, (rss_warm, rss_after)  # KiB: steady, not growing per job
    assert len(set(accepted)) == len(accepted)
