"""
Restoration without retraining (SPEC 19): a model trained on clean images
restores measurements y = A x + n (operators.py) by steering the sampler's
walk, on any noise process (noise_process.py) and with the samplers of
samplers.py that each method allows.

A walk visits the nodes k = 0 ... N-1 of a process's Nodes (x = alpha_k x_0
+ sigma_k eps) and ends at node N, the clean sample. The methods, one short
function each:

  sdedit   (Meng et al. 2022): start from the guide A+ y noised to node
           k_0 = N - round(t_start N) and sample from there; no operator needed.
  replace  (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
           appendix I.2 on imputation): after every step the measured part of
           x at node k+1 becomes that of y noised to node k+1.
  repaint  (Lugmayr et al. 2022, Algorithm 1): replace, plus resampling: on
           repaint_schedule's plan the walk climbs back up by re-noising
           (x_k ~ q(x_k | x_{k+1})) and descends again, so the unknown part
           has time to agree with the known one.
  ddnm     (Wang et al. 2023, Algorithm 1): every x0_hat is replaced by
           A+ y + (I - A+ A) x0_hat before the sampler uses it; with
           sigma_y > 0 (DDNM+, section 3.3) the correction is scaled by
           lambda_k = min(1, sigma_{k+1} / (alpha_{k+1} sigma_y)) so that the
           measurement noise it brings into the next node stays below that
           node's own noise level.
  dps      (Chung et al. 2023, Algorithm 1): after each step,
           x_{k+1} -= zeta grad_{x_k} ||y - A(x0_hat(x_k))||^2 with
           zeta = scale / ||y - A(x0_hat)|| (their step size), the gradient
           taken through the model (one backward pass per step).

Which samplers: sdedit and ddnm change only where the walk starts or the
denoiser's x0_hat, so every sampler runs them. replace, repaint and dps
change x between steps; a multistep solver (plms, dpmpp_*, unipc) would
extrapolate from x0_hats of a trajectory that the change left, and repaint
walks nodes out of order, so these three take the one-step samplers only
(ONE_STEP_SAMPLERS). Nothing in a step copies between host and device: the
coefficients are Python floats of the Nodes.
"""

import inspect
import math

import torch

from . import samplers
from .noise_process import Denoiser, model_device, noise_like

ONE_STEP_SAMPLERS = ("ddpm", "ddim", "euler", "heun")
METHOD_SAMPLERS = {
    "sdedit": tuple(samplers.SAMPLERS),
    "replace": ONE_STEP_SAMPLERS,
    "repaint": ONE_STEP_SAMPLERS,
    "ddnm": tuple(samplers.SAMPLERS),
    "dps": ONE_STEP_SAMPLERS,
}
METHODS = tuple(METHOD_SAMPLERS)
# The methods that paste a known part of x (operators.Operator.has_known_part).
KNOWN_PART_METHODS = ("replace", "repaint")


def repaint_schedule(steps, jump_length=10, jump_n_sample=10):
    """
    The step indices RePaint visits (Lugmayr et al. 2022, section 4.2 and
    Algorithm 1), from steps - 1 down to -1 (the clean sample): one step down
    at a time, except that on reaching an index that is a multiple of
    jump_length below steps - jump_length, the walk climbs jump_length steps
    back up and descends again, jump_n_sample - 1 times in all.

    :return: list of ints; consecutive entries differ by 1.
    """
    if steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError(
            f"repaint_schedule({steps}, {jump_length}, {jump_n_sample}): steps, jump_length and jump_n_sample "
            "must be at least 1 (the paper's setting: 250, 10, 10)"
        )
    jumps_left = {index: jump_n_sample - 1 for index in range(0, steps - jump_length, jump_length)}
    index = steps - 1
    visited = [index]
    while index > -1:
        index -= 1
        visited.append(index)
        if jumps_left.get(index, 0) > 0:
            jumps_left[index] -= 1
            for _ in range(jump_length):
                index += 1
                visited.append(index)
    return visited


def sdedit_start(num_steps, t_start):
    """The node SDEdit starts from: N - round(t_start N), at least one step before the end; t_start in (0, 1]."""
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start={t_start}: SDEdit starts at a fraction of the walk in (0, 1] (1: from pure noise)")
    return num_steps - max(1, round(t_start * num_steps))



def ddnm_scale(nodes, k, sigma_y):
    """
    DDNM+'s lambda for the x0_hat at node k (Wang et al. 2023, section 3.3):
    1 without measurement noise, else min(1, sigma_{k+1} / (alpha_{k+1} sigma_y)).
    """
    if sigma_y == 0:
        return 1.0
    alpha_next, sigma_next = nodes.alpha[k + 1], nodes.sigma[k + 1]
    return min(1.0, sigma_next / (alpha_next * sigma_y))


class NullSpaceDenoiser(Denoiser):
    """
    DDNM's denoiser (Wang et al. 2023, Algorithm 1, line 4): the model's x0_hat,
    clipped to [-1, 1] when clip_denoised, then x0_hat - lambda A+ (A x0_hat - y)
    (operators.Operator.project), and eps_hat recomputed from it. It acts as
    the node's denoised_fn (denoised_fn_at), so the processes' own DDIM and
    ancestral steps apply it too, with the lambda of the node being denoised.
    """

    def __init__(self, process, model, operator, y, *, clip_denoised=True, model_kwargs=None):
        super().__init__(process, model, clip_denoised=False, model_kwargs=model_kwargs)
        self.operator = operator
        self.y = y
        self.clip = clip_denoised

    def denoised_fn_at(self, nodes, k):
        scale = ddnm_scale(nodes, k, self.operator.sigma_y)
        return lambda pred_xstart: self.correct(pred_xstart, scale)

    def correct(self, pred_xstart, scale=1.0):
        """x0_hat [N x C x ...] -> A+ y + (I - A+ A) x0_hat (the correction scaled by lambda under noise)."""
        if self.clip:
            pred_xstart = pred_xstart.clamp(-1, 1)
        return self.operator.project(pred_xstart, self.y, scale)


class Walk:
    """
    One restoration's sampler over the nodes of a process: its SamplingContext,
    the sampler step, and the noise draws the methods add.

    :param shape: [N x C x ...] of the restorations.
    :param eta: the sampler's noise scale (None: its default; see samplers.ETA_DEFAULTS).
    """

    def __init__(self, diffusion, model, shape, sampler, *, nodes, device, generator, model_kwargs, clip_denoised,
                 eta):
        self.process, self.model, self.shape, self.sampler = diffusion, model, tuple(shape), sampler
        self.device, self.generator = device, generator
        self.model_kwargs, self.clip_denoised = model_kwargs, clip_denoised
        self.eta = eta = samplers.resolve_eta(sampler, eta)
        self.nodes = diffusion.sampling_nodes() if nodes is None else nodes
        samplers.check_first_node(sampler, self.nodes)
        self.num_steps = self.nodes.num_steps
        self.ctx = samplers.SamplingContext(
            diffusion, model, self.shape[0], device, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
            eta=eta, generator=generator, nodes=self.nodes,
        )
        self._step = samplers.get_sampler(sampler)

    def from_node(self, start):
        """The same walk from node `start` on."""
        return Walk(self.process, self.model, self.shape, self.sampler, nodes=self.nodes.from_node(start),
                    device=self.device, generator=self.generator, model_kwargs=self.model_kwargs,
                    clip_denoised=self.clip_denoised, eta=self.eta)

    def use_denoiser(self, denoiser):
        """
        Make every step denoise with `denoiser`; the sampler then clips x0_hat
        as the denoiser does (PLMS re-clips the x0_hat of its combined slope).
        """
        self.ctx.denoiser = denoiser
        self.ctx.clip_denoised = denoiser.clip_denoised

    def step(self, x, k):
        """The sampler's step from node k: {"sample": x at node k+1, "pred_xstart": x0_hat at node k}."""
        return self._step(self.ctx, x, k)

    def noise(self):
        """Standard normal noise of the restorations' shape, from the generator."""
        return noise_like(self.shape, self.device, self.generator)

    def standard_noise(self, noise=None):
        """The walk's standard normal starting noise: `noise` on the device, or a draw as sampling draws it."""
        return self.process.initial_noise(self.model, self.shape, noise=noise, device=self.device,
                                          generator=self.generator)

    def start(self, noise=None):
        """x at node 0, as sampling starts (samplers.starting_x)."""
        return samplers.starting_x(self.process, self.model, self.shape, self.nodes, noise=noise,
                                   device=self.device, generator=self.generator)

    def renoise(self, x, k):
        """
        x at node k drawn from q(x_k | x_{k+1}) (one step up the forward
        process: x_k = (alpha_k / alpha_{k+1}) x_{k+1} + sqrt(sigma_k^2 -
        (alpha_k sigma_{k+1} / alpha_{k+1})^2) z, RePaint's Algorithm 1, line 10).
        """
        ratio = self.nodes.alpha[k] / self.nodes.alpha[k + 1]
        std = math.sqrt(max(self.nodes.sigma[k] ** 2 - (ratio * self.nodes.sigma[k + 1]) ** 2, 0.0))
        return x * ratio + self.noise() * std

    def paste(self, x, y, operator, k):
        """
        x at node k with its measured part replaced by y's noised to node k:
        A+ (alpha_k y + sigma_k A z) + (I - A+ A) x (for inpainting: the known
        pixels of alpha_k x_0 + sigma_k z); y itself at the clean node.
        """
        alpha, sigma = self.nodes.alpha[k], self.nodes.sigma[k]
        target = y if sigma == 0 else y * alpha + operator(self.noise()) * sigma
        return operator.project(x, target)


def sdedit(walk, y, operator, *, noise=None, progress=False, t_start=0.5):
    """
    SDEdit (Meng et al. 2022, Algorithm 1): the guide A+ y (y itself without
    an operator) noised to the node k_0 = N - round(t_start N),
    x = alpha_{k_0} guide + sigma_{k_0} z, then the walk from there. At
    t_start = 1 the walk starts from the noise alone, exactly as unconditional
    sampling from the same noise.

    :param noise: the standard normal z, [N x C x ...].
    """
    start = sdedit_start(walk.num_steps, t_start)
    z = walk.standard_noise(noise)
    if start == 0:
        return _run(walk.step, walk.start(z), walk.num_steps, progress)
    guide = y if operator is None else operator.pinv(y)
    x = guide * walk.nodes.alpha[start] + z * walk.nodes.sigma[start]
    later = walk.from_node(start)
    return _run(later.step, x, later.num_steps, progress)


def replace(walk, y, operator, *, noise=None, progress=False):
    """
    Replacement (Song et al. 2021, appendix I.2): every step of the sampler,
    then the measured part of x replaced by y noised to the new node (Walk.paste).
    """

    def step(x, k):
        out = walk.step(x, k)
        return {"sample": walk.paste(out["sample"], y, operator, k + 1), "pred_xstart": out["pred_xstart"]}

    return _run(step, walk.start(noise), walk.num_steps, progress)


def repaint(walk, y, operator, *, noise=None, progress=False, jump_length=10, jump_n_sample=10):
    """
    RePaint (Lugmayr et al. 2022, Algorithm 1): replace's steps down, and on
    repaint_schedule(N, jump_length, jump_n_sample)'s plan steps back up by
    re-noising (Walk.renoise). Step index i is node N - 1 - i.
    """
    schedule = repaint_schedule(walk.num_steps, jump_length, jump_n_sample)
    last = walk.num_steps - 1

    def step(x, j):
        k, k_next = last - schedule[j], last - schedule[j + 1]
        if k_next < k:
            return {"sample": walk.renoise(x, k_next)}
        out = walk.step(x, k)
        return {"sample": walk.paste(out["sample"], y, operator, k_next), "pred_xstart": out["pred_xstart"]}

    return _run(step, walk.start(noise), len(schedule) - 1, progress)


def ddnm(walk, y, operator, *, noise=None, progress=False):
    """
    DDNM (Wang et al. 2023, Algorithm 1; DDNM+ for sigma_y > 0): the walk with
    NullSpaceDenoiser in place of the sampler's denoiser. With sigma_y = 0 the
    last step returns a corrected x0_hat: A(x) = y to float precision.
    """
    denoiser = NullSpaceDenoiser(walk.process, walk.model, operator, y, clip_denoised=walk.clip_denoised,
                                 model_kwargs=walk.model_kwargs)
    walk.use_denoiser(denoiser)
    return _run(walk.step, walk.start(noise), walk.num_steps, progress)


def dps(walk, y, operator, *, noise=None, progress=False, scale=1.0):
    """
    Diffusion posterior sampling (Chung et al. 2023, Algorithm 1, lines 3-7,
    with zeta_i = scale / ||y - A(x0_hat)|| as in their experiments): the
    sampler's step from x_k, then
    x_{k+1} -= zeta_i grad_{x_k} ||y - A(x0_hat(x_k))||^2 = 2 scale grad_{x_k} ||y - A(x0_hat(x_k))||,
    through the model's x0_hat at node k (one backward pass per step).
    """
    if not scale > 0:
        raise ValueError(f"scale={scale}: DPS's step size must be > 0")

    def step(x, k):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = walk.step(x, k)
            residual = (y - operator(out["pred_xstart"])).flatten(1).norm(dim=1)
            (gradient,) = torch.autograd.grad(residual.sum(), x)
        return {"sample": out["sample"].detach() - 2 * scale * gradient, "pred_xstart": out["pred_xstart"].detach()}

    return _run(step, walk.start(noise), walk.num_steps, progress)


METHOD_FUNCTIONS = {"sdedit": sdedit, "replace": replace, "repaint": repaint, "ddnm": ddnm, "dps": dps}


def _run(step, x, count, progress):
    """samplers.walk over `count` steps of `step`; the last sample, [N x C x ...]."""
    for out in samplers.walk(step, x, count, progress):
        x = out["sample"]
    return x


def check_method(method, sampler, operator):
    """
    Raise a ValueError naming the fix when `method` cannot run with this
    sampler or operator (None: no operator, which only sdedit takes).
    """
    if method not in METHOD_SAMPLERS:
        raise ValueError(f"unknown restoration method {method!r}: use one of {', '.join(METHODS)}")
    if sampler not in METHOD_SAMPLERS[method]:
        samplers.get_sampler(sampler)
        raise ValueError(
            f"{method} changes x between steps, which the multistep sampler {sampler} would extrapolate across: "
            f"use one of {', '.join(METHOD_SAMPLERS[method])}"
        )
    if operator is None and method != "sdedit":
        raise ValueError(f"{method} needs an operator (Inpaint, SuperRes, Deblur or Colorize); only sdedit takes none")
    if method in KNOWN_PART_METHODS and not operator.has_known_part:
        raise ValueError(
            f"{method} pastes the measured part of x, which {type(operator).__name__} does not copy from y "
            f"(its pseudo-inverse amplifies each frequency by up to 1 / cutoff): use ddnm or dps"
        )


def model_evaluations(method, sampler, num_steps, **method_args):
    """How many model evaluations one restoration makes over a walk of num_steps nodes."""
    if method == "sdedit":
        return samplers.model_evaluations(sampler, num_steps - sdedit_start(num_steps, method_args.get("t_start", 0.5)))
    if method == "repaint":
        schedule = repaint_schedule(num_steps, method_args.get("jump_length", 10), method_args.get("jump_n_sample", 10))
        return samplers.model_evaluations(sampler, sum(1 for i, j in zip(schedule, schedule[1:]) if j < i))
    return samplers.model_evaluations(sampler, num_steps)


def restore(diffusion, model, y, operator, method="ddnm", sampler="ddim", noise=None, generator=None,
            model_kwargs=None, progress=False, *, clip_denoised=True, eta=None, nodes=None, **method_args):
    """
    Restore images from their measurements y = operator(x) (+ noise).

    :param diffusion: any NoiseProcess (a GaussianDiffusion or SpacedDiffusion, EDM, flow).
    :param y: the measurements, [N x ...] as the operator makes them; for
        sdedit without an operator, the [N x C x ...] guide images.
    :param operator: an operators.Operator (or None for sdedit).
    :param method: one of METHODS; sampler: one of METHOD_SAMPLERS[method].
    :param noise: standard normal [N x C x ...] starting noise (sdedit: the z that noises the guide).
    :param generator: a torch.Generator, a list of one per image, or None: every draw.
    :param model_kwargs: passed to the model (e.g. {"y": labels} for a class-conditional one).
    :param clip_denoised: clamp each x0_hat to [-1, 1].
    :param eta: the noise scale of ddim (None: the sampler's default).
    :param nodes: the Nodes to walk (the process's sampling_nodes() by default).
    :param method_args: t_start (sdedit), jump_length and jump_n_sample
        (repaint), scale (dps).
    :return: the [N x C x ...] restorations.
    """
    check_method(method, sampler, operator)
    function = METHOD_FUNCTIONS[method]
    accepted = [name for name in inspect.signature(function).parameters if name not in ("noise", "progress")][3:]
    unknown = sorted(set(method_args) - set(accepted))
    if unknown:
        raise ValueError(f"{method} takes no {', '.join(unknown)}; its arguments: {', '.join(accepted) or 'none'}")
    device = model_device(model)
    y = y.to(device)
    if operator is not None:
        operator = operator.to(device)
    shape = y.shape if operator is None else operator.pinv(y).shape
    if operator is not None:
        operator.check_shape(shape)
    walk = Walk(diffusion, model, shape, sampler, nodes=nodes, device=device, generator=generator,
                model_kwargs=model_kwargs, clip_denoised=clip_denoised, eta=eta)
    with torch.no_grad():
        return function(walk, y, operator, noise=noise, progress=progress, **method_args)
