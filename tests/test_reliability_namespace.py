"""Faults that need root, inside a private mount namespace (`unshare -m`) so nothing leaks to
the host: a full file system (a small tmpfs), a read-only one, and a device node as output.

The CLI cases run through the zygote of test_reliability_cli (forks, one torch import), and
the file checks run inside the namespace, before its mounts disappear.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PREVIOUS = b"a previous result that must survive a failed run"


def _namespace_available() -> str:
    if os.geteuid() != 0:
        return "needs root (mounts a small tmpfs and makes a device node in a private mount namespace)"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare for a private mount namespace"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=16k tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()[:200]}"
    return ""


@pytest.fixture(scope="module")
def namespace_results(golden, tmp_path_factory):
    reason = _namespace_available()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("namespace")
    full, empty, readonly, devices, roomy = (tmp / n for n in ("full", "empty", "readonly", "devices", "roomy"))
    for directory in (full, empty, readonly, devices, roomy):
        directory.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "PYTHONPATH": str(REPO_ROOT)}

    def i2v(out: Path, *extra: str) -> list:
        return ["--quiet", "i2v", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"),
                "--prompt", "a cat", "--max-area", "12288", "--frame-num", "5", "--sample-steps", "2",
                "--device", "cpu", "--dtype", "float32", "--seed", "3", "--out", str(out), *extra]

    cases = [
        {"name": "mp4 onto a disk with 8 KB free", "args": i2v(full / "out.mp4")},
        {"name": "safetensors onto a disk with 0 bytes free", "args": i2v(empty / "out.safetensors")},
        {"name": "metrics onto a full disk", "args": i2v(roomy / "out.mp4", "--metrics-json", str(empty / "m.json"))},
        {"name": "metrics in a read-only directory", "args": i2v(roomy / "ro.mp4", "--metrics-json",
                                                                 str(readonly / "m.json"))},
        {"name": "metrics onto a device node", "args": i2v(roomy / "dev.mp4", "--metrics-json", str(devices / "null"))},
    ]
    for case in cases:
        case.update(env=env, cwd=str(tmp))
    (tmp / "cases.json").write_text(json.dumps(cases))
    script = f"""set -e
mount -t tmpfs -o size=256k tmpfs {full}
mount -t tmpfs -o size=256k tmpfs {empty}
mount -t tmpfs -o size=64k tmpfs {readonly}
mount -t tmpfs -o size=64k tmpfs {devices}
printf '%s' '{PREVIOUS.decode()}' > {full}/out.mp4
printf '%s' '{PREVIOUS.decode()}' > {empty}/out.safetensors
printf '%s' '{PREVIOUS.decode()}' > {readonly}/m.json
mount -o remount,ro {readonly}
mknod {devices}/null c 1 3
dd if=/dev/zero of={full}/fill bs=4096 2>/dev/null || true
truncate -s -8K {full}/fill
dd if=/dev/zero of={empty}/fill bs=4096 2>/dev/null || true
df -B1 --output=avail {full} {empty} | tail -n 2 > {tmp}/free.txt
{sys.executable} {REPO_ROOT / 'tests' / '_cli_zygote.py'} {tmp}/cases.json {tmp}/results.json
ls -A {full} > {tmp}/full.txt; ls -A {empty} > {tmp}/empty.txt; ls -A {readonly} > {tmp}/readonly.txt
cat {full}/out.mp4 > {tmp}/full-out.bin; cat {empty}/out.safetensors > {tmp}/empty-out.bin
cat {readonly}/m.json > {tmp}/readonly-m.bin
if [ -c {devices}/null ]; then echo char > {tmp}/device.txt; else echo changed > {tmp}/device.txt; fi
"""
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = {r["name"]: r for r in json.loads((tmp / "results.json").read_text())}
    return tmp, results


def _one_line(result) -> str:
    lines = [line for line in result["stderr"].splitlines() if line.strip() and not line.startswith("wrote ")]
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1, result["stderr"]
    return lines[0]


def test_the_disks_were_full(namespace_results):
    tmp, _ = namespace_results
    free_full, free_empty = (int(x) for x in (tmp / "free.txt").read_text().split())
    assert 0 < free_full <= 8192 and free_empty == 0


@pytest.mark.parametrize("name,listing,kept,output", [
    ("mp4 onto a disk with 8 KB free", "full", "full-out.bin", "out.mp4"),
    ("safetensors onto a disk with 0 bytes free", "empty", "empty-out.bin", "out.safetensors"),
])
def test_full_disk_fails_and_keeps_the_existing_file(namespace_results, name, listing, kept, output):
    tmp, results = namespace_results
    result = results[name]
    assert result["code"] == 1, result["stderr"]
    line = _one_line(result)
    assert "out." in line and "nothing was replaced" in line, line
    assert (tmp / kept).read_bytes() == PREVIOUS
    assert sorted((tmp / f"{listing}.txt").read_text().split()) == ["fill", output]  # no temporary file left


def test_metrics_on_a_full_disk_is_an_error_after_the_video(namespace_results):
    tmp, results = namespace_results
    result = results["metrics onto a full disk"]
    assert result["code"] == 1
    line = _one_line(result)
    assert "m.json" in line and "No space left" in line, line
    assert "m.json" not in (tmp / "empty.txt").read_text().split()
    assert (tmp / "roomy" / "out.mp4").stat().st_size > 0


def test_read_only_directory_and_device_node_are_refused_before_the_run(namespace_results):
    tmp, results = namespace_results
    for name, words in (("metrics in a read-only directory", ["--metrics-json", "not writable"]),
                        ("metrics onto a device node", ["--metrics-json", "character device"])):
        result = results[name]
        assert result["code"] == 2, result["stderr"]
        line = _one_line(result)
        assert all(word in line for word in words), line
    assert (tmp / "readonly-m.bin").read_bytes() == PREVIOUS
    assert (tmp / "device.txt").read_text().strip() == "char"
    assert not (tmp / "roomy" / "ro.mp4").exists() and not (tmp / "roomy" / "dev.mp4").exists()
