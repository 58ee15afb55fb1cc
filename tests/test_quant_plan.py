"""`wanengine plan --weights int8|fp8` (and the i2v spelling `--quantize`): the experts' and the
text encoder's block linears at 1 byte + one float32 scale per output row (spec formats.md 3:
the 14B expert ~0.52x its bf16 size, ~14.05 GB of 8-bit linears)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from wanengine.cli import app
from wanengine.constants import constants
from wanengine.errors import ConfigError
from wanengine.param_counts import count_dit_float32_params
from wanengine.plan import make_plan

GB = 1e9


def test_eight_bit_expert_sizes_follow_the_spec() -> None:
    bf16 = make_plan(size="1280*720", frame_num=81, dtype="bfloat16")
    int8 = make_plan(size="1280*720", frame_num=81, dtype="bfloat16", weights="int8", t5_weights="fp8")
    linears = 40 * (8 * 5120 * 5120 + 2 * 5120 * 13824)  # 40 blocks: 2 attentions x q k v o, ffn.0, ffn.2
    assert linears / GB == pytest.approx(14.05, abs=0.01)
    rows = 40 * (8 * 5120 + 13824 + 5120)
    kept = count_dit_float32_params(**constants()["i2v_a14b_dit"])[0]  # modulation, time MLPs: float32
    assert int8.dit_bytes_per_expert == (bf16.dit_params_per_expert - linears) * 2 + kept * 2 + linears + rows * 4
    assert int8.dit_bytes_per_expert / GB == pytest.approx(14.91, abs=0.01)  # spec: 14.8 GB with only the time
    assert 0.50 < int8.dit_bytes_per_expert / (bf16.dit_params_per_expert * 2) < 0.53  # projection counted
    assert 0.51 < int8.dit_bytes_per_expert / bf16.dit_bytes_per_expert < 0.52
    assert int8.memory.peak < bf16.memory.peak  # the expert on the device in the denoise phase
    t5_linears = 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240)
    assert int8.t5_bytes == pytest.approx((int8.t5_params - t5_linears) * 2 + t5_linears, rel=1e-3)
    assert any(a.startswith("8-bit weights:") for a in int8.assumptions)


def test_plan_reads_the_i2v_quantize_flag_and_rejects_other_formats() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["plan", "--quantize", "int8", "--hardware", "ascend-a2"])
    assert shown.exit_code == 0, shown.output
    assert "DiT, one expert (int8 linears)" in shown.output and "14.9 GB" in shown.output
    with pytest.raises(ConfigError, match="--weights: 'int4' is not an 8-bit format"):
        make_plan(weights="int4")
