"""
What post-hoc EMA changes on the digits demo: the demo's training run
(scripts/demo.sh's model, process and training flags) with
`--ema_std 0.05,0.10` and a snapshot every `--snapshot_interval` steps, then a
sweep of sigma_rel reconstructed from that one run (scripts/reconstruct_ema.py),
each sampled as the demo samples (DPM-Solver++(2M), logsnr20, 100 digits,
seed 0) and scored by the demo's checker (datasets/check_digits.py): the share
of samples classified as the requested digit, the mean probability of that
digit, and the share as close to a real digit as real digits are. The demo's
own `--ema_rate 0.995` EMA and the raw weights are scored alike.

    python benchmarks/bench_posthoc_ema_digits.py --out_dir runs/posthoc_digits

Everything goes through the real scripts; a rerun reuses the finished
training run (--resume_checkpoint auto) and redoes the sweep. bfloat16
autocast only on a CPU that computes it natively (precision.auto_bf16), as
the demo.
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "datasets"))

import check_digits  # noqa: E402  (datasets/ is not a package on sys.path otherwise)

from improved_diffusion.posthoc_ema import list_snapshots, representable_std_range  # noqa: E402
from digits_runs import run, write_digits  # noqa: E402
from improved_diffusion.precision import auto_bf16  # noqa: E402

# scripts/demo.sh's flags.
MODEL_FLAGS = ["--image_size", 8, "--image_channels", 1, "--num_channels", 64, "--num_res_blocks", 1,
               "--channel_mult", "1,2", "--attention_resolutions", "", "--class_cond", True, "--num_classes", 10]
DIFFUSION_FLAGS = ["--diffusion_steps", 1000, "--noise_schedule", "cosine", "--predict_v", True]
SAMPLER_FLAGS = ["--sampler", "dpmpp_2m", "--timestep_respacing", "logsnr20"]
EMA = "0.995"



def score(model_path, sample_dir, num_samples):
    """The checker's (share, mean confidence, in-distribution share) of samples of `model_path`."""
    run("scripts/image_sample.py", ["--model_path", model_path, *SAMPLER_FLAGS, "--num_samples", num_samples,
                                    "--batch_size", num_samples, "--seed", 0], sample_dir)
    npz = next(sample_dir.glob(f"samples_{num_samples}x*.npz"))
    result = check_digits.check_samples(*check_digits.load_samples(npz))
    return result["share"], result["mean_confidence"], result["in_distribution"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/posthoc_digits")
    parser.add_argument("--steps", type=int, default=600, help="training steps (the demo's 600)")
    parser.add_argument("--ema_std", default="0.05,0.10", help="the profiles tracked during training")
    parser.add_argument("--snapshot_interval", type=int, default=25)
    parser.add_argument("--sweep", default="0.01,0.02,0.03,0.05,0.07,0.10,0.13,0.16,0.20,0.25",
                        help="sigma_rel values to reconstruct (those the snapshots cannot represent are skipped)")
    parser.add_argument("--num_samples", type=int, default=100)
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)
    data_dir, run_dir = out / "digits", out / "run"
    write_digits(data_dir)
    train = ["--data_dir", data_dir, *MODEL_FLAGS, *DIFFUSION_FLAGS, "--lr", "2e-3", "--batch_size", 64,
             "--ema_rate", EMA, "--max_steps", args.steps, "--save_interval", args.steps, "--log_interval", 100,
             "--resume_checkpoint", "auto", "--seed", 0, "--use_bf16", auto_bf16("cpu"), "--ema_std", args.ema_std,
             "--ema_snapshot_interval", args.snapshot_interval]
    run("scripts/image_train.py", train, run_dir)

    snapshots = list_snapshots(str(run_dir))
    steps, stds = [s for s, _, _ in snapshots], [std for _, std, _ in snapshots]
    low, high = representable_std_range(steps, stds, args.steps)
    sweep = [s for s in map(float, args.sweep.split(",")) if low <= s <= high]
    print(f"{len(snapshots)} snapshots up to step {args.steps} represent sigma_rel {low:.3f} to {high:.3f}", flush=True)
    run("scripts/reconstruct_ema.py", ["--log_dir", run_dir, "--ema_std", ",".join(f"{s:.3f}" for s in sweep)],
        out / "reconstruct")

    candidates = [(f"raw weights (model{args.steps:06d}.pt)", "-", run_dir / f"model{args.steps:06d}.pt"),
                  (f"the demo's `--ema_rate {EMA}`", "-", run_dir / f"ema_{EMA}_{args.steps:06d}.pt")]
    candidates += [(f"post-hoc `--ema_std {s:.3f}`", f"{s:.3f}", run_dir / f"ema_std{s:.3f}_{args.steps:06d}.pt")
                   for s in sweep]
    rows = []
    for label, sigma, path in candidates:
        share, confidence, in_distribution = score(path, out / "samples" / path.stem, args.num_samples)
        rows.append((label, sigma, share, confidence, in_distribution))
        print(f"{label}: recognized {share:.3f}", flush=True)
    print("\n| weights | sigma_rel | recognized | mean probability of the digit | as close as real digits |")
    print("| --- | --- | --- | --- | --- |")
    for label, sigma, share, confidence, in_distribution in rows:
        print(f"| {label} | {sigma} | {share:.3f} | {confidence:.2f} | {in_distribution:.2f} |")


if __name__ == "__main__":
    main()
