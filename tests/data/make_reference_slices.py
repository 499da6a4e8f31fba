"""
Cut tests/data/reference_slices.pt from ../shared/golden/diffusion_cases.pt.

The probe model and every per-element diffusion output are elementwise, so a
spatial corner of the inputs maps to the same corner of the outputs: a small,
exact slice of the reference's numbers that every checkout can test against.
Run from the repository root: python tests/data/make_reference_slices.py
"""

import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT.parent / "shared" / "golden" / "diffusion_cases.pt"
TARGET = pathlib.Path(__file__).with_name("reference_slices.pt")
ELEMENTWISE = (
    "q_sample", "q_mean_variance", "q_posterior_mean_variance", "p_mean_variance_clipTrue",
    "p_mean_variance_clipFalse", "ddim_sample", "ddim_reverse_sample", "ddim_sample_loop",
)


def corner(value):
    """The first two batch elements and the top-left 1x2 pixels of every [N x C x H x W] tensor."""
    if isinstance(value, dict):
        return {k: corner(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [corner(v) for v in value]
    return value[:2, :, :1, :2].clone()


def slice_case(case):
    sliced = {k: case[k] for k in ("schedule", "steps", "respacing", "mean_type", "var_type",
                                   "loss_type", "rescale_timesteps", "model_out_channels")}
    for key in ("x_start", "x_t", "noise", "loop_noise"):
        if key in case:
            sliced[key] = corner(case[key])
    for key in ("t", "t_reverse", "y"):
        sliced[key] = case[key][:2].clone()
    sliced["expected"] = {k: corner(v) for k, v in case["expected"].items() if k in ELEMENTWISE}
    return sliced


def main():
    cases = [c for c in torch.load(SOURCE, weights_only=True) if c["kind"] == "diffusion"]
    cases = [c for i, c in enumerate(cases) if i % 4 == 0 or (i % 8 == 3 and "ddim_sample_loop" in c["expected"])]
    torch.save([slice_case(c) for c in cases], TARGET)
    print(f"wrote {len(cases)} cases to {TARGET} ({TARGET.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
