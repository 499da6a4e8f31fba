"""
The samplers of SPEC 11 measured three ways.

1. Quality per model evaluation on an exact model (improved_diffusion.mixture:
   a 2-D Gaussian mixture whose optimal denoiser is known) on each noise
   process: "vp" (the DDPM family, linear schedule of 1000 steps), "edm"
   (EDMDiffusion's defaults) and "flow" (FlowDiffusion): for each sampler and
   budget of model evaluations, the Fréchet distance of its samples to the
   mixture's exact moments and the RMS distance to the exact probability-flow
   solution from the same x_T. Tables, the goal check (SPEC 18: on every
   process the best sampler at 10 evaluations is at least as close in
   distribution as its Euler at 50) and a PNG plot per process of the error
   against evaluations (--plot).
2. Each sampler's own cost per model evaluation, with a near-free model
   (x -> 0.1 x) on a [64 x 3 x 32 x 32] batch, as a ratio to DDIM's in the same run.
3. --cifar: the wall time of dpmpp_2m with 10 steps against ddim50 with the
   benchmarks' small preset (a 32x32 UNet, random weights), one batch.
4. --guidance: classifier-free guided sampling (one forward of the doubled
   batch per step) against two unguided passes, same preset.
5. --searched: on EDM and flow, each deterministic sampler at 10 evaluations
   over nodes found by search_timesteps (improved_diffusion/timestep_search.py)
   on another batch than the one scored, against Euler at 50 on the default
   spacing (SPEC 18's goal with the nodes chosen for the model).

    python benchmarks/bench_samplers.py                      # 1 and 2
    python benchmarks/bench_samplers.py --cifar --plot samplers.png
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from improved_diffusion import samplers
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.evaluation import feature_statistics, frechet_distance
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from improved_diffusion.timestep_search import search_timesteps

from presets import SMALL_PRESET  # benchmarks/ is on sys.path when run as a script

MIXTURES = {
    "sharp": GaussianMixture([0.2, 0.3, 0.25, 0.25], [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.6, -0.4]],
                             [0.1, 0.15, 0.08, 0.12]),
    "smooth": GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25]),
}
DETERMINISTIC = ("ddim", "euler", "heun", "plms", "dpmpp_2m", "dpmpp_3m", "unipc")


def spaced(spec, steps=1000):
    betas = get_named_beta_schedule("linear", steps)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, spec, betas=betas), betas=betas,
                           model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL,
                           loss_type=LossType.MSE)


def steps_for(sampler, evaluations):
    """The most steps whose cost is within `evaluations` model evaluations (None if none)."""
    fitting = [s for s in range(1, evaluations + 1) if samplers.model_evaluations(sampler, s) <= evaluations]
    return max(fitting) if fitting else None


def frechet_to_exact(samples, mixture):
    """Fréchet distance of the samples' Gaussian fit to the mixture's exact moments."""
    mean, cov = mixture.moments()
    return frechet_distance(*feature_statistics(samples.numpy()), mean.numpy(), cov.numpy())


class ExactRuns:
    """
    One process on a mixture's exact model: sample(sampler, spec, x_T) runs a
    sampler over the nodes `spec` names, exact(spec, x_T) is the exact
    probability-flow solution from the same x_T to the last node, then x0-hat.
    """

    def __init__(self, process, mixture):
        self.process, self.mixture, self.cache = process, mixture, {}
        if process == "vp":
            self.alphas_cumprod = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
            self.model = mixture.model(self.alphas_cumprod)
        elif process == "edm":
            self.diffusion = EDMDiffusion()
            self.model = mixture.edm_model(self.diffusion.sigma_data)
        else:
            self.diffusion = FlowDiffusion()
            self.model = mixture.flow_model()

    def sample(self, sampler, spec, x_T):
        kwargs = dict(noise=x_T, clip_denoised=False, generator=torch.Generator().manual_seed(1))
        if self.process == "vp":
            return spaced(spec).sample_loop(self.model, x_T.shape, sampler, **kwargs)
        return self.diffusion.sample_loop(self.model, x_T.shape, sampler, timestep_respacing=spec, **kwargs)

    def exact(self, spec, x_T):
        mixture = self.mixture
        if self.process == "vp":
            ends = (-1, min(spaced(spec).timestep_map))
        elif self.process == "edm":
            ends = tuple(self.diffusion.sampling_sigmas(spec)[i] for i in (0, -1))
        else:
            ends = tuple(self.diffusion.sampling_times(spec)[i] for i in (0, -1))
        if ends not in self.cache:
            if self.process == "vp":
                abar = self.alphas_cumprod[ends[1]]
                x = mixture.ode_solution(x_T, self.alphas_cumprod[ends[0]], abar, steps=1000)
                self.cache[ends] = mixture.pred_xstart(x, abar)
            elif self.process == "edm":
                x = mixture.edm_ode_solution(x_T * ends[0], ends[0], ends[1], steps=1000)
                self.cache[ends] = mixture.denoise(x, 1.0, ends[1])
            else:
                x = mixture.flow_ode_solution(x_T * ends[0], ends[0], ends[1], steps=400)
                self.cache[ends] = mixture.denoise(x, 1 - ends[1], ends[1])
        return self.cache[ends]


def quality_table(process, mixture, budgets, spacing, n):
    """{sampler: [(evaluations, FD, RMS error) per budget]} of one process, and the floor."""
    runs = ExactRuns(process, mixture)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    floor = float("nan")
    for name in samplers.SAMPLERS:
        rows = []
        for budget in budgets:
            count = steps_for(name, budget)
            exact = runs.exact(f"{spacing}{count}", x_T)
            out = runs.sample(name, f"{spacing}{count}", x_T)
            error = ((out - exact) ** 2).sum(1).mean().sqrt().item()
            rows.append((samplers.model_evaluations(name, count), frechet_to_exact(out, mixture), error))
            if name == "ddim" and budget == max(budgets):
                floor = frechet_to_exact(exact, mixture)
        results[name] = rows
    return results, floor


def ddim_100(mixture, n):
    """The VP process's DDIM with 100 steps (ddim100): SPEC 11's bar."""
    runs = ExactRuns("vp", mixture)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return frechet_to_exact(runs.sample("ddim", "ddim100", x_T), mixture)


def goal_line(results, budgets):
    """SPEC 18's goal: the best sampler at 10 evaluations at least as close in distribution as euler at 50."""
    if 10 not in budgets or 50 not in budgets:
        return "goal (best at 10 evaluations vs euler at 50): needs budgets 10 and 50"
    at_10 = {name: rows[budgets.index(10)] for name, rows in results.items()}
    best = min(at_10, key=lambda name: at_10[name][1])
    euler_50 = results["euler"][budgets.index(50)][1]
    met = "met" if at_10[best][1] <= euler_50 else "not met"
    return (f"goal {met}: best at 10 evaluations {best} (FD {at_10[best][1]:.2e}) against euler at 50 "
            f"(FD {euler_50:.2e})")


def print_quality(process, name, spacing, results, budgets, floor, extra=""):
    print(f"\n### {process} process, {name} mixture, {spacing}N spacing: Fréchet distance to the exact moments "
          f"(RMS error to the exact ODE solution)\n")
    print("| sampler | " + " | ".join(f"{b} evals" for b in budgets) + " |")
    print("| --- |" + " --- |" * len(budgets))
    for sampler, rows in results.items():
        cells = [f"{fd:.2e} ({err:.1e})" + ("" if evals == b else f" [{evals}]") for (evals, fd, err), b in
                 zip(rows, budgets)]
        print(f"| {sampler} | " + " | ".join(cells) + " |")
    print(f"\n{extra}the exact solution's own distance (the estimate's floor): {floor:.2e}. [k]: k evaluations "
          f"where the budget does not fit the sampler. {goal_line(results, budgets)}")


def plot(path, curves, budgets, title):
    """A log-log PNG of RMS error against evaluations, one coloured line per sampler, with a legend and title."""
    width, height, margin = 720, 480, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    errors = [e for rows in curves.values() for (_, _, e) in rows if e > 0]
    low, high = math.log10(min(errors)), math.log10(max(errors))
    left, right = math.log10(min(budgets)), math.log10(max(budgets))

    def point(evals, error):
        x = margin + (math.log10(evals) - left) / (right - left) * (width - 2 * margin)
        y = height - margin - (math.log10(error) - low) / (high - low) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, margin // 2 - 6), title, fill="black")
    for b in budgets:
        x, _ = point(b, 10**low)
        draw.text((x - 6, height - margin + 8), str(b), fill="black")
    for exponent in range(math.ceil(low), math.floor(high) + 1):
        _, y = point(budgets[0], 10**exponent)
        draw.text((8, y - 6), f"1e{exponent}", fill="black")
    draw.text((width // 2 - 120, height - 24), "model evaluations (log)  vs  RMS error to the exact ODE (log)",
              fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    for k, (name, rows) in enumerate(curves.items()):
        points = [point(evals, err) for evals, _, err in rows if err > 0]
        draw.line(points, fill=colours[k % len(colours)], width=2)
        draw.text((width - margin - 90, margin + 8 + 14 * k), name, fill=colours[k % len(colours)])
    image.save(path)


class NearFreeModel(torch.nn.Module):
    def forward(self, x, timesteps):
        return 0.1 * x


def overhead_table(batch_size, steps, repeats):
    """Median ms per model evaluation spent outside the model, per sampler, and its ratio to DDIM's."""
    diffusion = spaced(f"logsnr{steps}", steps=1000)
    model = NearFreeModel()
    shape = (batch_size, 3, 32, 32)
    times = {name: [] for name in samplers.SAMPLERS}
    for _ in range(repeats + 1):
        for name in samplers.SAMPLERS:
            start = time.perf_counter()
            diffusion.sample_loop(model, shape, name, generator=torch.Generator().manual_seed(0))
            times[name].append((time.perf_counter() - start) / samplers.model_evaluations(name, steps))
    per_eval = {name: statistics.median(values[1:]) * 1e3 for name, values in times.items()}
    print(f"\n### Own cost per model evaluation, near-free model, batch {batch_size} of 3x32x32, {steps} steps\n")
    print("| sampler | ms per evaluation | ratio to ddim |")
    print("| --- | --- | --- |")
    for name, ms in per_eval.items():
        print(f"| {name} | {ms:.3f} | {ms / per_eval['ddim']:.2f} |")


def cifar_wall_time(batch_size, repeats):
    """Wall seconds of dpmpp_2m over logsnr10 and of ddim over ddim50 with the small preset, taken in turns."""
    flags = {**model_and_diffusion_defaults(), **SMALL_PRESET}
    model, _ = create_model_and_diffusion(**flags)
    model.eval()
    runs = {
        "dpmpp_2m, logsnr10": (create_model_and_diffusion(**{**flags, "timestep_respacing": "logsnr10"})[1], "dpmpp_2m"),
        "ddim, ddim50": (create_model_and_diffusion(**{**flags, "timestep_respacing": "ddim50"})[1], "ddim"),
    }
    shape = (batch_size, 3, 32, 32)
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, (diffusion, sampler) in runs.items():
                start = time.perf_counter()
                diffusion.sample_loop(model, shape, sampler, generator=torch.Generator().manual_seed(0))
                times[name].append(time.perf_counter() - start)
    print(f"\n### Small preset (32x32 UNet, 64 channels), batch {batch_size}, CPU, {torch.get_num_threads()} threads\n")
    print("| sampler | model evaluations | median wall s | ratio to ddim50 |")
    print("| --- | --- | --- | --- |")
    reference = statistics.median(times["ddim, ddim50"])
    for name, values in times.items():
        evals = 10 if name.startswith("dpmpp") else 50
        print(f"| {name} | {evals} | {statistics.median(values):.2f} | {statistics.median(values) / reference:.2f} |")


def guidance_cost(batch_size, repeats):
    """Wall seconds of classifier-free guided sampling (one doubled batch) against two unguided passes."""
    flags = {**model_and_diffusion_defaults(), **SMALL_PRESET, "class_cond": True, "num_classes": 10,
             "class_dropout_prob": 0.1, "timestep_respacing": "logsnr10"}
    model, diffusion = create_model_and_diffusion(**flags)
    model.eval()
    shape, labels = (batch_size, 3, 32, 32), {"y": torch.arange(batch_size) % 10}
    runs = {"unguided": 1.0, "guided, scale 3": 3.0}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, scale in runs.items():
                start = time.perf_counter()
                diffusion.sample_loop(model, shape, "dpmpp_2m", model_kwargs=labels, guidance_scale=scale,
                                      generator=torch.Generator().manual_seed(0))
                times[name].append(time.perf_counter() - start)
    unguided, guided = (statistics.median(times[name]) for name in runs)
    print(f"\n### Classifier-free guidance, small preset, batch {batch_size}, dpmpp_2m logsnr10\n")
    print("| run | median wall s | ratio to two unguided passes |\n| --- | --- | --- |")
    print(f"| unguided | {unguided:.2f} | {unguided / (2 * unguided):.2f} |")
    print(f"| guided (one forward of the doubled batch per step) | {guided:.2f} | {guided / (2 * unguided):.2f} |")


def searched_nodes_table(mixture_names, n, search_n=2000, grid_size=200):
    """Section 5 of the docstring: one markdown table over the EDM and flow processes and the mixtures."""
    print("\n### 10 evaluations over searched nodes against Euler at 50 (Fréchet distance to the exact moments)\n")
    print("| process | mixture | euler, 50 evaluations | " + " | ".join(SEARCHED) + " | goal |")
    print("| --- | --- | --- |" + " --- |" * (len(SEARCHED) + 1))
    for process, default in (("edm", "karras50"), ("flow", "uniform50")):
        for name in mixture_names:
            runs = ExactRuns(process, MIXTURES[name])
            x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            x_search = torch.randn(search_n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            euler = frechet_to_exact(runs.sample("euler", default, x_T), MIXTURES[name])
            cells = []
            for sampler in SEARCHED:
                count = steps_for(sampler, 10)
                nodes, _ = search_timesteps(runs.diffusion, runs.model, x_search, count, sampler,
                                            grid_size=grid_size, clip_denoised=False)
                out = runs.diffusion.with_nodes(nodes).sample_loop(runs.model, x_T.shape, sampler, noise=x_T,
                                                                   clip_denoised=False)
                cells.append(frechet_to_exact(out, MIXTURES[name]))
            goal = "met" if min(cells) <= euler else "not met"
            print(f"| {process} | {name} | {euler:.2e} | " + " | ".join(f"{c:.2e}" for c in cells) + f" | {goal} |")


SEARCHED = ("dpmpp_2m", "dpmpp_3m", "unipc", "plms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="5,8,10,15,20,50")
    parser.add_argument("--processes", default="vp,edm,flow")
    parser.add_argument("--spacing", default="logsnr", help="the vp process's node spacings (comma-separated)")
    parser.add_argument("--edm_spacing", default="karras,logsnr")
    parser.add_argument("--flow_spacing", default="uniform,logsnr")
    parser.add_argument("--num_points", type=int, default=20000)
    parser.add_argument("--mixtures", default="sharp,smooth")
    parser.add_argument("--plot", default="", help="write a PNG of error vs evaluations (first mixture)")
    parser.add_argument("--overhead_batch", type=int, default=64)
    parser.add_argument("--overhead_steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar", action="store_true")
    parser.add_argument("--cifar_batch", type=int, default=8)
    parser.add_argument("--guidance", action="store_true", help="time classifier-free guidance (small preset)")
    parser.add_argument("--searched", action="store_true", help="only section 5: searched nodes on EDM and flow")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.searched:
        searched_nodes_table(args.mixtures.split(","), args.num_points)
        return
    spacings = {"vp": args.spacing, "edm": args.edm_spacing, "flow": args.flow_spacing}
    for process in args.processes.split(","):
        for k, name in enumerate(args.mixtures.split(",")):
            for j, spacing in enumerate(spacings[process].split(",")):
                results, floor = quality_table(process, MIXTURES[name], budgets, spacing, args.num_points)
                extra = ""
                if process == "vp":
                    extra = f"DDIM with 100 steps (ddim100): {ddim_100(MIXTURES[name], args.num_points):.2e}; "
                print_quality(process, name, spacing, results, budgets, floor, extra)
                if args.plot and k == 0 and j == 0:
                    path = args.plot if process == "vp" else args.plot.replace(".png", f"_{process}.png")
                    plot(path, {s: results[s] for s in DETERMINISTIC}, budgets,
                         f"{process} process, {name} mixture, {spacing}N spacing")
                    print(f"\nplot: {path}")
    overhead_table(args.overhead_batch, args.overhead_steps, args.repeats)
    if args.cifar:
        cifar_wall_time(args.cifar_batch, args.repeats)
    if args.guidance:
        guidance_cost(args.cifar_batch, args.repeats)


if __name__ == "__main__":
    main()
