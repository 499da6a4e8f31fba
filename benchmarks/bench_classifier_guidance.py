"""
What guidance costs per sampling step, as ratios within one run (random weights).

1. Classifier guidance: on a fixed batch x_t, the UNet's forward against the
   noisy classifier's forward and backward (classifier_util.classifier_cond_fn,
   the gradient a guided step adds).
2. Classifier-free guidance: a guided sampling loop (one forward of the
   doubled batch per step) against two unguided loops of the same batch (the
   issue's bar: at most 1.05x).

Presets: "small" (the benchmarks' 32x32 preset, presets.py, with a classifier
of 64 channels and the same attention) and "digits" (the digits demo's model
and the classifier of benchmarks/guidance.md). Medians over --repeats, the
measured calls taking turns; times are this process's CPU seconds
(time.process_time), which other jobs on a shared machine disturb far less
than wall time (with one thread they are the wall time of an idle machine).

    OMP_NUM_THREADS=1 python benchmarks/bench_classifier_guidance.py --presets small,digits
"""

import argparse
import statistics
import time

import torch

from improved_diffusion.classifier_util import classifier_cond_fn
from improved_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

from presets import SMALL_PRESET  # benchmarks/ is on sys.path when run as a script

CONDITIONAL = {"class_cond": True, "num_classes": 10, "class_dropout_prob": 0.1}
PRESETS = {
    "small": (
        {**SMALL_PRESET, **CONDITIONAL},
        {"image_size": 32, "classifier_width": 64, "classifier_depth": 2, "classifier_attention_resolutions": "16,8"},
    ),
    "digits": (
        {"image_size": 8, "image_channels": 1, "num_channels": 64, "num_res_blocks": 1, "channel_mult": "1,2",
         "attention_resolutions": "", "diffusion_steps": 1000, "noise_schedule": "cosine", "predict_v": True,
         **CONDITIONAL},
        {"image_size": 8, "image_channels": 1, "classifier_width": 64, "classifier_depth": 1,
         "classifier_attention_resolutions": "", "diffusion_steps": 1000, "noise_schedule": "cosine"},
    ),
}


def build(preset):
    """(model, classifier, diffusion) of `preset` in eval mode, the diffusion over ddim10."""
    model_flags, classifier_flags = PRESETS[preset]
    flags = {**model_and_diffusion_defaults(), **model_flags, "timestep_respacing": "ddim10"}
    model, diffusion = create_model_and_diffusion(**flags)
    classifier_flags = {**classifier_and_diffusion_defaults(), **classifier_flags, "num_classes": 10}
    classifier, _ = create_classifier_and_diffusion(**classifier_flags)
    return model.eval(), classifier.eval(), diffusion


def timed(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def medians(calls, repeats):
    """{name: median CPU seconds} of each call, the calls taking turns `repeats` times after one warm-up round."""
    times = {name: [] for name in calls}
    for round_index in range(repeats + 1):
        for name, fn in calls.items():
            seconds = timed(fn)
            if round_index:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def image_shape(preset, batch_size):
    """[batch x C x S x S] of the preset's images."""
    flags = {**model_and_diffusion_defaults(), **PRESETS[preset][0]}
    return batch_size, flags["image_channels"], flags["image_size"], flags["image_size"]


def step_costs(preset, batch_size, repeats):
    """Seconds of one UNet forward and of one cond_fn call on the same x_t."""
    model, classifier, _ = build(preset)
    x = torch.randn(image_shape(preset, batch_size), generator=torch.Generator().manual_seed(0))
    t = torch.full((batch_size,), 500.0)
    y = torch.arange(batch_size) % 10
    cond_fn = classifier_cond_fn(classifier, 1.0)
    with torch.no_grad():  # as classifier_sample.py samples
        return medians({"unet": lambda: model(x, t, y=y), "cond_fn": lambda: cond_fn(x, t, y=y)}, repeats)


def cfg_costs(preset, batch_size, repeats):
    """Seconds of an unguided and of a classifier-free guided ddim10 loop of the same batch."""
    model, _, diffusion = build(preset)
    shape, kwargs = image_shape(preset, batch_size), {"y": torch.arange(batch_size) % 10}

    def loop(scale):
        return lambda: diffusion.sample_loop(model, shape, "ddim", model_kwargs=kwargs, guidance_scale=scale,
                                             generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        return medians({"unguided": loop(1.0), "guided": loop(3.0)}, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,digits")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets.split(",")
    print(f"\n### Guidance cost per sampling step, batch {args.batch_size}, medians of {args.repeats}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| preset | UNet forward CPU ms | classifier fwd+bwd (cond_fn) CPU ms | cond_fn / UNet "
          "| (UNet + cond_fn) / UNet | CFG loop CPU ms | two unguided loops CPU ms | CFG / two unguided |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset in presets:
        step = step_costs(preset, args.batch_size, args.repeats)
        cfg = cfg_costs(preset, args.batch_size, args.repeats)
        ratio = step["cond_fn"] / step["unet"]
        print(f"| {preset} | {1e3 * step['unet']:.1f} | {1e3 * step['cond_fn']:.1f} | {ratio:.2f} | "
              f"{1 + ratio:.2f} | {1e3 * cfg['guided']:.0f} | {2e3 * cfg['unguided']:.0f} | "
              f"{cfg['guided'] / (2 * cfg['unguided']):.2f} |")


if __name__ == "__main__":
    main()
