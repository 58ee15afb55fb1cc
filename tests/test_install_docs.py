"""The README's CPU install recipe and CI's script (`.ci/run`) run the same commands, so the
recipe CI tests is the one users read (CI only drops the public --index-url: its CPU wheel of
torch is on local disk)."""
from __future__ import annotations

import re
import shlex

from helpers import REPO_ROOT


def _commands(lines):
    """pip/pytest commands as word lists, without the interpreter, -q and --index-url."""
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        words = shlex.split(line) if line else []
        if words[:2] not in (["python3", "-m"], ["python", "-m"]) or words[2] not in ("pip", "pytest"):
            continue
        words = words[2:]
        if "--index-url" in words:
            at = words.index("--index-url")
            del words[at:at + 2]
        if words[:2] == ["pip", "install"] and "--upgrade" in words:
            continue  # CI upgrades pip in its fresh virtualenv first
        out.append([w for w in words if w != "-q"])
    return out


def test_readme_cpu_recipe_is_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*CPU\*\*.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README has no CPU install recipe"
    recipe = _commands(block.group(1).splitlines())
    ci = _commands((REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines())
    assert recipe == ci and recipe, (recipe, ci)
    assert ["pip", "install", "torch==2.13.0"] in recipe and recipe[-1][0] == "pytest"
    assert "https://download.pytorch.org/whl/cpu" in block.group(1)
