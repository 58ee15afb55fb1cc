"""Documented upper bounds of what one run may ask for, checked before anything is allocated.

They are the limits of the model and the reference release, not of this machine (the memory
preflight, `wanengine.memory_check`, covers the machine):

- `--frame-num` <= 4093: the reference's 3-D RoPE has positions 0..1023 per axis, i.e. at
  most 1024 latent frames (4 * 1023 + 1 frames).
- frame size <= 16384 px per side (1024 RoPE positions of 2x2 patches of 8x8 pixels).
- `--sample-steps` <= 1000: the scheduler has 1000 training timesteps; more steps repeat them.
- `--seed` 0 .. 2**63 - 1 (a negative seed draws one): the generator's seed is a signed 64-bit
  integer.
- DiT `text_len` <= 4096 (the release uses 512; the text is padded to it on every forward).
"""
from __future__ import annotations

MAX_FRAME_NUM = 4093
MAX_SIDE = 16384
MAX_STEPS = 1000
SEED_MAX = 2**63 - 1
MAX_TEXT_LEN = 4096
