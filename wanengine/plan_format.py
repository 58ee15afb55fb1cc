"""Rendering of a `Plan` (see `wanengine.plan`) as the tables `wanengine plan` prints."""
from __future__ import annotations

from typing import List, Optional

from .plan import DTYPE_BYTES, GB, PHASES, Plan

def _si(value: float, unit: str = "FLOP") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s ({value / 60:.1f} min)"


def format_plan(plan: Plan) -> str:
    """A readable multi-line table of the plan (what `wanengine plan` prints)."""
    g, f, m, t = plan.geometry, plan.flops, plan.memory, plan.timing
    lines: List[str] = []
    row = lambda label, *cols: lines.append(f"  {label:<32}" + "".join(f"{c:>14}" for c in cols).rstrip())  # noqa: E731
    parallel = [name for name, on in (("DiT FSDP", plan.dit_fsdp), ("T5 FSDP", plan.t5_fsdp),
                                      ("T5 on CPU", plan.t5_cpu), ("VAE parallel", plan.vae_parallel)) if on]
    mixed = f.dit_forwards not in (0, plan.steps * f.forwards_per_step)
    guidance = "on for one expert only" if mixed else ("on" if plan.cfg else "off")
    lines.append(f"wanengine plan: {g.width}x{g.height}, {plan.frame_num} frames, {plan.steps} steps "
                 f"({plan.solver}), guidance {guidance}")
    lines.append(f"layout: {plan.world_size} device(s) = cfg {plan.cfg_size} x ulysses {plan.ulysses_size}"
                 f"{'; ' + ', '.join(parallel) if parallel else ''}; offload {'on' if plan.offload else 'off'}; "
                 f"{plan.dtype}; weights on {'the CPU' if plan.placement == 'cpu' else 'the accelerator'}")
    if plan.peak_tflops is not None:
        capacity = f", {m.capacity / GB:.0f} GB" if m.capacity else ""
        lines.append(f"device: {plan.device or 'custom'}: {plan.peak_tflops:g} TFLOP/s x {plan.efficiency:.2f} "
                     f"efficiency{capacity}")
    lines.append("Geometry")
    row("output frame", f"{g.width} x {g.height} x {g.frame_num}")
    row("latent", " x ".join(str(n) for n in g.latent))
    row("DiT tokens L", f"{g.tokens:,}")
    row("seq_len (per rank)", f"{g.seq_len:,} ({g.tokens_per_rank:,})")
    lines.append("Parameters")
    width = DTYPE_BYTES[plan.dtype]
    expert = plan.dit_params_per_expert
    dit_bytes = plan.dit_bytes_per_expert if plan.dit_bytes_per_expert is not None else expert * width
    t5_bytes = plan.t5_bytes if plan.t5_bytes is not None else plan.t5_params * width
    eight_bit = lambda fmt: f" ({fmt} linears)" if fmt else ""  # noqa: E731
    row("DiT, one expert" + eight_bit(plan.weights), f"{expert / 1e9:.2f} B", f"{dit_bytes / GB:.1f} GB")
    row("UMT5-XXL encoder" + eight_bit(plan.t5_weights), f"{plan.t5_params / 1e9:.2f} B", f"{t5_bytes / GB:.1f} GB")
    row("VAE", f"{plan.vae_params / 1e6:.1f} M", f"{plan.vae_params * 4 / GB:.2f} GB")
    lines.append("Compute" + " " * 27 + f"{'whole run':>14}{'per device':>14}")
    share = f.attention_per_block / (f.attention_per_block + f.linear_per_block)
    row("linear / block", _si(f.linear_per_block))
    row(f"attention / block ({share:.0%})", _si(f.attention_per_block))
    row("one forward", _si(f.per_forward), _si(f.per_device_forward))
    row(f"one step ({f.forwards_per_step} forwards)", _si(f.per_step), _si(f.per_device_step))
    if f.forwards_per_device_step != f.forwards_per_step:
        row("", "", f"({f.forwards_per_device_step:g} forward{'' if f.forwards_per_device_step == 1 else 's'}"
                    f"{' on average' if f.forwards_per_device_step != int(f.forwards_per_device_step) else ''})")
    row(f"video ({plan.steps} steps, {f.dit_forwards} forwards)", _si(f.per_video), _si(f.per_device_video))
    row("T5 / VAE encode / VAE decode", f"{_si(f.t5)} / {_si(f.vae_encode)} / {_si(f.vae_decode)}")
    lines.append("Memory per device (GB)" + " " * 12 + "".join(f"{p:>14}" for p in PHASES))
    for label, *values in m.rows:
        row(label, *(f"{v / GB:.2f}" if v else "-" for v in values))
    row("total", *(f"{v / GB:.2f}" for v in m.phases))
    of = f" of {m.capacity / GB:.0f} GB" if m.capacity else ""
    lines.append(f"  peak {m.peak / GB:.1f} GB in the {m.peak_phase} phase{of}")
    if plan.host_bytes_per_rank:
        lines.append(f"  host memory: {plan.host_bytes_per_rank / GB:.1f} GB of weights per rank "
                     f"(offloaded experts and the text encoder wait there)")
    if t is not None:
        lines.append("Time estimate (one device)")
        row("compute / step", _seconds(t.compute_per_step_s))
        for label, value in (("Ulysses all-to-all / step", t.ulysses_comm_per_step_s),
                             ("CFG exchange / step", t.cfg_comm_per_step_s),
                             ("FSDP all-gather / step (hidden)", t.fsdp_gather_per_step_s)):
            if value:  # None: no link bandwidth known; 0: that parallel mode is off
                row(label, _seconds(value))
        row("step", _seconds(t.per_step_s))
        row(f"denoising ({plan.steps} steps)", _seconds(t.denoise_s))
        row("T5 + VAE encode + VAE decode",
            " + ".join(_seconds(v) for v in (t.t5_s, t.vae_encode_s, t.vae_decode_s)))
        row("video (without model loading)", _seconds(t.per_video_s))
    if plan.warnings:
        lines.append("Warnings")
        lines.extend(f"  ! {w}" for w in plan.warnings)
    lines.append("Assumptions")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    return "\n".join(lines)
