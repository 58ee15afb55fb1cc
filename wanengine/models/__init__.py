"""Models with the released tensor names, and their loaders.

`load_tokenizer(ckpt_dir)`, `load_t5(path, *, device, dtype)`, `load_dit(expert_dir, *, device,
dtype)` and `load_vae(path, *, device, dtype)` read the released Wan2.2-I2V-A14B layout as is.
"""
