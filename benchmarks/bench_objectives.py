"""
The digits demo's model trained with each objective of SPEC 15 and 18, same
steps and seed: eps-prediction, eps with min-SNR-5 weighting (--snr_gamma 5),
v-prediction (--predict_v True), EDM (--objective edm) and flow matching
(--objective flow), scored at 500, 1000 and 1500 steps by the demo's checker: the share of samples classified as the requested digit, and
the Fréchet distance of the checker's logits (its 10-way decision function)
between the samples and the real digits. The variant `cfg` (not run by
default) trains with --class_dropout_prob 0.1 for classifier-free guidance
(benchmarks/bench_samplers_digits.py --guidance_scales samples it).

    python benchmarks/bench_objectives.py --out_dir runs/objectives
    python benchmarks/bench_objectives.py --preset demo --out_dir runs/objectives_demo

--preset demo trains today's demo instead (scripts/demo.sh: one gray
channel, 600 steps) as v-prediction (the demo's), EDM and flow, scored at
200, 400 and 600 steps, each sampled as the demo samples: DPM-Solver++(2M)
over logsnr20 (20 evaluations).

Everything goes through the real scripts (datasets/digits.py,
scripts/image_train.py, scripts/image_sample.py with about 50 model
evaluations per sample: ddim50 for the DDPM family, EDM's Heun over karras25
(49), the flow's Euler over uniform50; 500 samples, seed 0), with the demo's
model and training flags (the DDPM family's cosine schedule of 1000 steps); bfloat16 autocast only on
a CPU that computes it natively (precision.auto_bf16).
"""

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "datasets"))

import check_digits  # noqa: E402  (datasets/ is not a package on sys.path otherwise)
import digits  # noqa: E402

from improved_diffusion.evaluation import feature_statistics, frechet_distance  # noqa: E402
from digits_runs import run, write_digits  # noqa: E402
from improved_diffusion.precision import auto_bf16  # noqa: E402

MODEL_FLAGS = ["--image_size", "8", "--num_channels", "64", "--num_res_blocks", "1", "--channel_mult", "1,2",
               "--attention_resolutions", "", "--class_cond", "True", "--num_classes", "10"]
DDPM_FLAGS = ["--diffusion_steps", "1000", "--noise_schedule", "cosine"]
# name: (what the table calls it, the training flags it adds, the objective's sampling at E evaluations)
VARIANTS = {
    "eps": ("eps", DDPM_FLAGS, "ddpm"),
    "eps_minsnr5": ("eps, --snr_gamma 5", DDPM_FLAGS + ["--snr_gamma", "5"], "ddpm"),
    "v": ("v, --predict_v True", DDPM_FLAGS + ["--predict_v", "True"], "ddpm"),
    "edm": ("EDM, --objective edm", ["--objective", "edm"], "edm"),
    "flow": ("flow, --objective flow", ["--objective", "flow"], "flow"),
    "cfg": ("eps, --class_dropout_prob 0.1", DDPM_FLAGS + ["--class_dropout_prob", "0.1"], "ddpm"),
}


def sampling_flags(objective, evaluations):
    """image_sample.py's sampler flags for about `evaluations` model evaluations per sample."""
    if objective == "edm":  # Heun: 2 N - 1 evaluations over N nodes
        return ["--timestep_respacing", f"karras{(evaluations + 1) // 2}"]
    if objective == "flow":
        return ["--timestep_respacing", f"uniform{evaluations}"]
    return ["--use_ddim", "True", "--timestep_respacing", f"ddim{evaluations}"]
DEFAULT_VARIANTS = "eps,eps_minsnr5,v,edm,flow"
# preset: (model flags added, default variants, default steps, sampling flags at E evaluations or None: the objective's)
PRESETS = {
    "rgb": ([], DEFAULT_VARIANTS, "500,1000,1500", None),
    "demo": (["--image_channels", "1"], "v,edm,flow", "200,400,600",
             lambda evaluations: ["--sampler", "dpmpp_2m", "--timestep_respacing", f"logsnr{evaluations}"]),
}
EMA = "0.995"



def checker_logits(images):
    """The checker's decision function on uint8 [N x 8 x 8 x 3] images: float [N x 10]."""
    model = check_digits.fit_classifier(8)
    return model["classifier"].decision_function(check_digits.to_features(images) / digits.MAX_LEVEL)


def real_logits():
    levels, _ = digits.load_digit_arrays()
    return checker_logits(np.stack([np.asarray(digits.render_digit(x, 8).convert("RGB")) for x in levels]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/objectives")
    parser.add_argument("--preset", default="rgb", choices=sorted(PRESETS))
    parser.add_argument("--steps", default="", help="checkpoints to score (default: the preset's)")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--evaluations", type=int, default=0,
                        help="model evaluations per sample, about (default: 50; the demo preset: 20)")
    parser.add_argument("--variants", default="", help=f"a comma-separated subset of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    extra_model_flags, variants, default_steps, preset_sampling = PRESETS[args.preset]
    evaluations = args.evaluations or (20 if args.preset == "demo" else 50)
    out = pathlib.Path(args.out_dir)
    data_dir = out / "digits"
    write_digits(data_dir)
    steps = [int(s) for s in (args.steps or default_steps).split(",")]
    real = feature_statistics(real_logits())
    rows = []
    for name in (args.variants or variants).split(","):
        label, flags, objective = VARIANTS[name]
        sampling = preset_sampling(evaluations) if preset_sampling else sampling_flags(objective, evaluations)
        run_dir = out / name
        train = ["--data_dir", data_dir, *MODEL_FLAGS, *extra_model_flags, "--lr", "2e-3", "--batch_size", 64,
                 "--ema_rate", EMA, "--max_steps", max(steps), "--save_interval", min(steps), "--log_interval", 100,
                 "--resume_checkpoint", "auto", "--seed", 0, "--use_bf16", auto_bf16("cpu"), *flags]
        run("scripts/image_train.py", train, run_dir)
        for step in steps:
            sample_dir = run_dir / f"samples_{step}"
            sample = ["--model_path", run_dir / f"ema_{EMA}_{step:06d}.pt", *sampling,
                      "--num_samples", args.num_samples, "--batch_size", 250, "--seed", 0]
            run("scripts/image_sample.py", sample, sample_dir)
            images, labels = check_digits.load_samples(next(sample_dir.glob("samples_*.npz")))
            share = check_digits.check_samples(images, labels)["share"]
            fd = frechet_distance(*feature_statistics(checker_logits(images)), *real)
            rows.append((label, step, share, fd))
            print(f"{label} at {step} steps: share {share:.3f}, FD {fd:.2f}", flush=True)
    print(f"\n| objective | steps | recognized | checker-logit FD |\n| --- | --- | --- | --- |")
    for name, step, share, fd in rows:
        print(f"| {name} | {step} | {share:.3f} | {fd:.2f} |")


if __name__ == "__main__":
    main()
