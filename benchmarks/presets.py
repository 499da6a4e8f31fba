"""The "small preset" the training and sampling benchmarks share (issue text's configuration)."""

SMALL_PRESET = {
    "image_size": 32,
    "num_channels": 64,
    "num_res_blocks": 2,
    "learn_sigma": True,
    "noise_schedule": "cosine",
    "diffusion_steps": 4000,
    "attention_resolutions": "16,8",
    "num_heads": 4,
}
