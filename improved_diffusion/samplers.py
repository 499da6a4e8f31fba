"""
Samplers for a GaussianDiffusion (or a SpacedDiffusion): DDPM, DDIM and the
fast ODE/SDE solvers that reach the same quality in far fewer model evaluations.

The math, once. The process keeps N timesteps; a sampler walks them from the
noisiest to the cleanest, node k = 0 ... N-1, and ends at node N, a clean
sample. At node k, abar_k is the cumulative product of the process's alphas,

    alpha_k = sqrt(abar_k),  sigma_k = sqrt(1 - abar_k),
    lambda_k = log(alpha_k / sigma_k)        (half the log-SNR),
    sigmatilde_k = sigma_k / alpha_k          (Karras et al.'s sigma),

and node N has abar = 1 (alpha = 1, sigma = 0, lambda = +inf). With
x_t = alpha x_0 + sigma eps, the model's output gives eps-hat and x0-hat,
related by x_t = alpha x0-hat + sigma eps-hat. The probability-flow ODE has
the exact solution, from lambda_s to lambda_t (Lu et al. 2022b, section 3, data prediction):

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0-hat(lambda) dlambda,

and, in xtilde = x / alpha against sigmatilde, it reads
d xtilde / d sigmatilde = eps-hat (Karras et al. 2022, eq. 4 with s = 1).
The multistep solvers approximate x0-hat over each step [lambda_k, lambda_{k+1}]
(h = lambda_{k+1} - lambda_k) by a polynomial through earlier x0-hats. The
step to node N has h = inf and is first order for every solver: x = x0-hat.

Each sampler is one function `sampler(ctx, x, k)` that takes x at node k and
returns {"sample": x at node k+1, "pred_xstart": x0-hat at node k}; they share
one loop (`walk`) and one adapter from the model's output to (eps-hat,
x0-hat) (`SamplingContext.denoise`). Coefficients are Python floats computed
from the float64 schedule before the loop, so a step copies nothing between
host and device.
"""

import math

import numpy as np
import torch
from tqdm.auto import tqdm

# Below this many steps the multistep solvers lower their order near the end
# (DPM-Solver++'s "lower_order_final").
LOWER_ORDER_FINAL_BELOW = 15


def noise_like(shape, device, generator=None, dtype=torch.float32):
    """
    Standard normal noise of `shape` ([N x ...]).

    :param generator: None (the global RNG), a torch.Generator on `device`, or
        a list of N generators, one per batch element, so that each sample's
        noise does not depend on which batch it is drawn in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator]
        )
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def walk_timesteps(diffusion):
    """The base-process timesteps a sampler visits, noisiest first (a list of ints)."""
    return sorted(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)), reverse=True)


def walk(step, x, num_steps, progress=False):
    """
    The one sampling loop: x = step(x, k)["sample"] for k = 0 ... num_steps-1,
    without autograd, yielding each step's dict.
    """
    indices = tqdm(range(num_steps)) if progress else range(num_steps)
    for k in indices:
        with torch.no_grad():
            out = step(x, k)
        yield out
        x = out["sample"]


class SamplingContext:
    """
    What a sampler step needs: the schedule of the walk as Python floats, the
    model adapter, the noise source and a memory for multistep solvers.

    :param diffusion: the GaussianDiffusion whose timesteps are walked.
    :param batch_size: N, the batch size of x.
    :param eta: the sampler's noise scale (DDIM's eta, the SDE solver's eta).
    :param generator: a torch.Generator, a list of one per sample, or None.
    :param guidance: a ClassifierFreeGuidance, or None.
    """

    def __init__(self, diffusion, model, batch_size, device, clip_denoised=True, denoised_fn=None,
                 model_kwargs=None, cond_fn=None, eta=0.0, generator=None, guidance=None):
        self.diffusion = diffusion
        self.model = model
        self.guidance = guidance
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.model_kwargs = model_kwargs
        self.cond_fn = cond_fn
        self.eta = eta
        self.generator = generator
        self.num_steps = diffusion.num_timesteps
        abar = np.append(diffusion.alphas_cumprod[::-1], 1.0)
        self.alpha = np.sqrt(abar).tolist()
        self.sigma = np.sqrt(1.0 - abar).tolist()
        with np.errstate(divide="ignore"):
            self.lam = (0.5 * (np.log(abar) - np.log1p(-abar))).tolist()
        self.timesteps = torch.arange(self.num_steps, device=device).flip(0)
        self.base_timesteps = walk_timesteps(diffusion)
        self.batch_size = batch_size
        self.memory = {}

    def t(self, k):
        """The process's timestep indices at node k, int64 [N] on the device."""
        return self.timesteps[k].expand(self.batch_size)

    def model_at(self, k):
        """The model to evaluate at node k: guided where the guidance applies, else the model itself."""
        if self.guidance is None:
            return self.model
        return self.guidance.at(self.base_timesteps[k])

    def is_last(self, k):
        return k == self.num_steps - 1

    def h(self, k):
        """lambda_{k+1} - lambda_k (inf for the step to the clean sample)."""
        return self.lam[k + 1] - self.lam[k]

    def noise(self, x):
        return noise_like(x.shape, x.device, self.generator, x.dtype)

    def denoise(self, x, k):
        """
        The model at node k as (eps-hat, x0-hat), each [N x C x ...]: any
        ModelMeanType, learned-variance channels dropped, denoised_fn and
        clipping applied to x0-hat (eps-hat recomputed from it), then
        classifier guidance in score form (Dhariwal & Nichol 2021, Algorithm 2):
        eps-hat -= sigma_k * grad log p(y | x_t).
        """
        d, t = self.diffusion, self.t(k)
        a, s = self.alpha[k], self.sigma[k]
        if a == 0 and (d.model_mean_type.name == "EPSILON" or self.cond_fn is not None):
            raise ValueError(
                f"abar = 0 at timestep {k} of the walk (zero terminal SNR): eps-hat alone cannot give x0-hat "
                "there; use a model that predicts x_0 (or drop that timestep from the respacing)"
            )
        mean_output, _ = d._split_output(d._call_model(self.model_at(k), x, t, self.model_kwargs), x)
        if d.model_mean_type.name == "EPSILON" and self.denoised_fn is None and not self.clip_denoised:
            eps = mean_output
            pred_xstart = combine((1 / a, x), (-s / a, eps))
        else:
            pred_xstart = d._pred_xstart(mean_output, x, t, self.clip_denoised, self.denoised_fn)
            eps = combine((1 / s, x), (-a / s, pred_xstart))
        if self.cond_fn is not None:
            eps = eps - s * d._call_model(self.cond_fn, x, t, self.model_kwargs)
            pred_xstart = combine((1 / a, x), (-s / a, eps))
        return eps, pred_xstart

    def ddim_transfer(self, x, eps, k):
        """
        x at node k+1 from x at node k along the DDIM path with this eps (DDIM
        eq. 12, eta = 0): alpha_{k+1} x0 + sigma_{k+1} eps with x0 = (x - sigma_k eps) / alpha_k,
        that x0 clipped (and eps with it) when clip_denoised.
        """
        a, s, a_next, s_next = self.alpha[k], self.sigma[k], self.alpha[k + 1], self.sigma[k + 1]
        if not self.clip_denoised:
            return combine((a_next / a, x), (s_next - a_next * s / a, eps))
        pred_xstart = combine((1 / a, x), (-s / a, eps)).clamp_(-1, 1)
        return combine((s_next / s, x), (a_next - s_next * a / s, pred_xstart))

    def order(self, k, max_order):
        """
        The multistep order at node k: at most max_order, at most k + 1 (the
        history there is), and, when there are fewer than LOWER_ORDER_FINAL_BELOW
        steps, at most the number of steps left before the last node (so the
        last step between timesteps is first order and the one before it at
        most second, as the authors' DPM-Solver++); 1 for the step to the clean sample.
        """
        order = min(max_order, k + 1)
        if self.num_steps < LOWER_ORDER_FINAL_BELOW:
            order = min(order, self.num_steps - 1 - k)
        return 1 if self.is_last(k) else order


def combine(*terms):
    """sum_i c_i * tensor_i for (float c_i, tensor_i) pairs, one kernel per term; zero weights skipped."""
    terms = [(c, tensor) for c, tensor in terms if c != 0]
    out = terms[0][1] * terms[0][0]
    for c, tensor in terms[1:]:
        out.add_(tensor, alpha=c)
    return out


def _remember(ctx, key, value, keep):
    """Append value to ctx.memory[key], keeping the last `keep`; return the list (oldest first)."""
    history = ctx.memory.setdefault(key, [])
    history.append(value)
    del history[:-keep]
    return history


# ---------------------------------------------------------------- samplers


def ddpm(ctx, x, k):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): GaussianDiffusion.p_sample."""
    d = ctx.diffusion
    return d.p_sample(ctx.model_at(k), x, ctx.t(k), ctx.clip_denoised, ctx.denoised_fn, ctx.model_kwargs,
                      ctx.generator, cond_fn=ctx.cond_fn)


def ddim(ctx, x, k):
    """DDIM (Song et al. 2020, eq. 12) with ctx.eta: GaussianDiffusion.ddim_sample."""
    d = ctx.diffusion
    return d.ddim_sample(ctx.model_at(k), x, ctx.t(k), ctx.clip_denoised, ctx.denoised_fn, ctx.model_kwargs,
                         ctx.eta, ctx.generator, cond_fn=ctx.cond_fn)


def euler(ctx, x, k):
    """
    Euler's method on d xtilde / d sigmatilde = eps-hat (Karras et al. 2022,
    Algorithm 1 without its Heun correction); the same path as DDIM with eta = 0.
    """
    eps, pred_xstart = ctx.denoise(x, k)
    return {"sample": _euler_step(ctx, x, eps, k), "pred_xstart": pred_xstart}


def _euler_step(ctx, x, eps, k):
    """alpha_{k+1} (x / alpha_k + (sigmatilde_{k+1} - sigmatilde_k) eps), [N x C x ...]."""
    a, a_next = ctx.alpha[k], ctx.alpha[k + 1]
    dsigma = ctx.sigma[k + 1] / a_next - ctx.sigma[k] / a
    return combine((a_next / a, x), (a_next * dsigma, eps))


def heun(ctx, x, k):
    """
    Heun's second-order method on the same ODE (Karras et al. 2022, Algorithm 1,
    deterministic): an Euler step, then the trapezoid of the slopes at both
    ends. Two model evaluations per step, one for the step to the clean sample.
    """
    eps, pred_xstart = ctx.denoise(x, k)
    x_next = _euler_step(ctx, x, eps, k)
    if not ctx.is_last(k):
        eps_next, _ = ctx.denoise(x_next, k + 1)
        x_next = _euler_step(ctx, x, combine((0.5, eps), (0.5, eps_next)), k)
    return {"sample": x_next, "pred_xstart": pred_xstart}


# Adams-Bashforth weights of the newest eps first, by how many past eps-hats exist.
_ADAMS_BASHFORTH = {1: (1.5, -0.5), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms(ctx, x, k):
    """
    Pseudo linear multistep (Liu et al. 2022, PNDM, section 3): the DDIM
    transfer with an Adams-Bashforth combination of the last four eps-hats.
    The warm-up is the paper's pseudo improved Euler step (S-PNDM): the first
    step evaluates the model twice, the next two use orders 2 and 3, so N
    steps cost N + 1 evaluations (N >= 2).
    """
    eps, pred_xstart = ctx.denoise(x, k)
    past = ctx.memory.get("eps", [])
    if not past and not ctx.is_last(k):
        eps_next, _ = ctx.denoise(ctx.ddim_transfer(x, eps, k), k + 1)
        combined = combine((0.5, eps), (0.5, eps_next))
    elif not past:
        combined = eps
    else:
        weights = _ADAMS_BASHFORTH[len(past)]
        combined = combine(*zip(weights, [eps, *reversed(past)]))
    _remember(ctx, "eps", eps, keep=3)
    return {"sample": ctx.ddim_transfer(x, combined, k), "pred_xstart": pred_xstart}


def dpmpp_2m(ctx, x, k):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): _dpmpp_step of order 2."""
    return _dpmpp_step(ctx, x, k, max_order=2)


def dpmpp_3m(ctx, x, k):
    """DPM-Solver++(3M), the third-order multistep form (Lu et al. 2022b, section 3.3)."""
    return _dpmpp_step(ctx, x, k, max_order=3)


def _dpmpp_step(ctx, x, k, max_order):
    """
    x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} [phi_1 D0 - phi_2 D1 + phi_3 D2], with
    phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2 and D0, D1,
    D2 the x0-hat, its first and second divided differences in lambda scaled by h
    (the Taylor expansion of x0-hat in lambda). The second-order form takes
    -phi_1 / 2 for phi_2 and no D2, as Algorithm 2 does. The differences are
    linear in the last x0-hats m0, m1, m2, so the step is one linear combination.
    """
    _, pred_xstart = ctx.denoise(x, k)
    m = _remember(ctx, "x0", pred_xstart, keep=3)[::-1]
    order, h = ctx.order(k, max_order), ctx.h(k)
    phi_1 = math.expm1(-h)
    base = -ctx.alpha[k + 1] * phi_1
    weights = [base, 0.0, 0.0]
    if order == 2:
        r0 = ctx.h(k - 1) / h
        weights = [base * (1 + 0.5 / r0), -base * 0.5 / r0, 0.0]
    elif order == 3:
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        r0, r1 = ctx.h(k - 1) / h, ctx.h(k - 2) / h
        # D1 = (1 + q) D1_0 - q D1_1 and D2 = (D1_0 - D1_1) / (r0 + r1), q = r0 / (r0 + r1),
        # with D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1.
        q = r0 / (r0 + r1)
        u = ctx.alpha[k + 1] * (phi_2 * (1 + q) - phi_3 / (r0 + r1))
        w = ctx.alpha[k + 1] * (phi_2 * q - phi_3 / (r0 + r1))
        weights = [base + u / r0, -u / r0 - w / r1, w / r1]
    terms = [(ctx.sigma[k + 1] / ctx.sigma[k], x)] + list(zip(weights[:order], m))
    return {"sample": combine(*terms), "pred_xstart": pred_xstart}


def dpmpp_2m_sde(ctx, x, k):
    """
    DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022b, section 5 and
    appendix), with noise scale eta (1: the SDE; 0: dpmpp_2m):
    x_{k+1} = (sigma_{k+1}/sigma_k) e^{-eta h} x_k + alpha_{k+1} (1 - e^{-(1+eta) h}) D
              + sigma_{k+1} sqrt(1 - e^{-2 eta h}) z,  D = x0 + (x0 - x0_prev) / (2 r).
    """
    _, pred_xstart = ctx.denoise(x, k)
    h, eta = ctx.h(k), ctx.eta
    m = _remember(ctx, "x0", pred_xstart, keep=2)[::-1]
    gain = -ctx.alpha[k + 1] * math.expm1(-(1 + eta) * h)
    decay = 0.0 if ctx.is_last(k) else (ctx.sigma[k + 1] / ctx.sigma[k]) * math.exp(-eta * h)
    terms = [(decay, x), (gain, pred_xstart)]
    if ctx.order(k, 2) == 2:
        r = ctx.h(k - 1) / h
        terms = [(decay, x), (gain * (1 + 0.5 / r), m[0]), (-gain * 0.5 / r, m[1])]
    if not ctx.is_last(k) and eta != 0:
        terms.append((ctx.sigma[k + 1] * math.sqrt(-math.expm1(-2 * eta * h)), ctx.noise(x)))
    return {"sample": combine(*terms), "pred_xstart": pred_xstart}


def unipc(ctx, x, k):
    """
    UniPC (Zhao et al. 2023, section 3) with B(h) = e^h - 1, data prediction:
    first the UniC corrector of node k's x, reusing the evaluation at the
    predicted x, then the UniP-2 predictor to node k+1. The step to the clean
    sample (x = x0-hat) needs no corrector before it, and none follows it.
    """
    _, pred_xstart = ctx.denoise(x, k)
    memory = ctx.memory
    if "x" in memory and not ctx.is_last(k):
        x = _unipc_update(ctx, memory["x"], memory["x0"], memory["order"], k - 1, pred_xstart)
    history = _remember(ctx, "x0", pred_xstart, keep=2)
    order = ctx.order(k, 2)
    memory.update(x=x, order=order)
    return {"sample": _unipc_update(ctx, x, history, order, k, None), "pred_xstart": pred_xstart}


def _unipc_update(ctx, x, history, order, k, pred_xstart_next):
    """
    From x at node k with x0-hats history[-order:] (the last, m_k, at node k), x at node k+1:
    (sigma_{k+1}/sigma_k) x - alpha_{k+1} [phi_1 m_k + B(h) sum_j a_j D_j], with
    D_j = (x0_j - m_k) / r_j the divided differences at r_j = (lambda_j - lambda_k) / h
    and here B(h) = phi_1 = expm1(-h). As a predictor (pred_xstart_next None)
    it uses the order - 1 earlier points with a = 1/2 for the one term of order
    2; as the corrector it adds the point r = 1 at node k+1 and solves
    sum_j a_j r_j^(i-1) = i! phi_{i+1}(-h) (-h) / B(h), i = 1 ... order.
    """
    h = ctx.h(k)
    base = -ctx.alpha[k + 1] * math.expm1(-h)
    points = [history[-1 - j] for j in range(1, order)]
    ratios = [(ctx.lam[k - j] - ctx.lam[k]) / h for j in range(1, order)]
    if pred_xstart_next is None:
        coefficients = [0.5] * len(points)
    else:
        points.append(pred_xstart_next)
        ratios.append(1.0)
        coefficients = [0.5] if len(points) == 1 else _unic_coefficients(ratios, -h)
    own = base * (1 - sum(a / r for a, r in zip(coefficients, ratios)))
    terms = [(ctx.sigma[k + 1] / ctx.sigma[k], x), (own, history[-1])]
    terms += [(base * a / r, point) for a, r, point in zip(coefficients, ratios, points)]
    return combine(*terms)


def _unic_coefficients(ratios, z):
    """Solve the 2 x 2 system [1, 1; r_1, r_2] a = [1! phi_2(z) z, 2! phi_3(z) z] / B, B = e^z - 1."""
    b_h = math.expm1(z)
    phi_2 = (math.expm1(z) / z - 1) / z
    phi_3 = (phi_2 - 0.5) / z
    rhs = [phi_2 * z / b_h, 2 * phi_3 * z / b_h]
    (r_1, r_2) = ratios
    a_1 = (rhs[0] * r_2 - rhs[1]) / (r_2 - r_1)
    return [a_1, rhs[0] - a_1]


class ClassifierFreeGuidance:
    """
    Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = out_u + s (out_c - out_u)
    on the mean channels, out_c and out_u from one forward of the doubled batch
    [x, x] with labels [y, null_label]; learned-variance channels from the
    conditional half. The combination is affine, so it is the same whether the
    model predicts eps, x0, v or x_{t-1}. Scale 1 is the conditional model and
    scale 0 the unconditional one, each called alone.

    :param model: called as model(x, t, y=labels, **kwargs).
    :param scale: the guidance scale s.
    :param null_label: the label meaning "no class" (a UNet's null_label, index num_classes).
    :param interval: (lo, hi): guide only at base timesteps lo <= t <= hi
        (Kynkaanniemi et al. 2024), evaluating the conditional half alone elsewhere.
    """

    def __init__(self, model, scale, null_label, interval=None):
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.interval = interval

    def at(self, base_timestep):
        """The callable to use at this base timestep (a Python int: no device read)."""
        inside = self.interval is None or self.interval[0] <= base_timestep <= self.interval[1]
        if not inside or self.scale == 1:
            return self.model
        return self.unconditional if self.scale == 0 else self.guided

    def unconditional(self, x, t, y, **kwargs):
        return self.model(x, t, y=torch.full_like(y, self.null_label), **kwargs)

    def guided(self, x, t, y, **kwargs):
        """x: [N x C x ...], t: [N], y: [N] -> the guided [N x C(or 2C) x ...] output."""
        doubled = {key: torch.cat([value, value]) for key, value in kwargs.items()}
        labels = torch.cat([y, torch.full_like(y, self.null_label)])
        cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), y=labels, **doubled).chunk(2)
        channels = x.shape[1]
        mean = torch.lerp(uncond[:, :channels], cond[:, :channels], self.scale)
        return torch.cat([mean, cond[:, channels:]], dim=1) if cond.shape[1] > channels else mean


def null_label_of(model):
    """
    The null label of a UNet built with one (its `null_label`, index num_classes),
    looking through autocast and compile wrappers; None for a model without one.
    """
    while isinstance(model, torch.nn.Module):
        if isinstance(getattr(model, "null_label", None), int):
            return model.null_label
        inner = getattr(model, "model", None)
        model = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
    return None


SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "plms": plms,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
}

# Samplers that step in x / sqrt(abar), which no abar = 0 timestep allows.
NEED_NONZERO_ABAR = ("euler", "heun", "plms")
# Samplers that read ctx.eta, with their default noise scale.
ETA_DEFAULTS = {"ddim": 0.0, "dpmpp_2m_sde": 1.0}
# Samplers that draw noise at every step (and so read `generator` after x_T).
STOCHASTIC = ("ddpm", "ddim", "dpmpp_2m_sde")


def get_sampler(name):
    """The sampler function called `name`; a clear error listing the known ones otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def model_evaluations(name, num_steps):
    """How many model evaluations per sample `name` makes over num_steps steps."""
    get_sampler(name)
    if name == "heun":
        return 2 * num_steps - 1
    if name == "plms" and num_steps >= 2:
        return num_steps + 1
    return num_steps


def sample_loop_progressive(diffusion, model, shape, sampler="ddim", noise=None, clip_denoised=True,
                            denoised_fn=None, model_kwargs=None, device=None, progress=False, eta=None,
                            generator=None, cond_fn=None, guidance_scale=1.0, guidance_interval=None,
                            null_label=None):
    """
    Walk the process's timesteps from the noisiest down with the named sampler,
    yielding each step's {"sample", "pred_xstart"}; the last "sample" is clean.

    :param shape: the [N x C x ...] shape of the samples; noise, optional x_T of it.
    :param eta: the noise scale of "ddim" and "dpmpp_2m_sde" (None: 0 and 1);
        another sampler given a nonzero eta is an error.
    :param cond_fn: classifier guidance, cond_fn(x, t, **model_kwargs) -> grad log p(y | x).
    :param guidance_scale: classifier-free guidance scale (1: none), with the
        labels in model_kwargs["y"] and `null_label` (default: the UNet's
        null_label, index num_classes) meaning no class; guidance_interval (lo, hi) limits
        it to those base timesteps (see ClassifierFreeGuidance).
    """
    step = get_sampler(sampler)
    if eta is None:
        eta = ETA_DEFAULTS.get(sampler, 0.0)
    elif eta != 0 and sampler not in ETA_DEFAULTS:
        raise ValueError(f"eta={eta} applies only to the samplers {', '.join(ETA_DEFAULTS)}; {sampler!r} ignores it")
    guidance = _guidance(model, model_kwargs, guidance_scale, guidance_interval, null_label)
    x = diffusion._initial_noise(model, shape, noise, device, generator)
    ctx = SamplingContext(diffusion, model, x.shape[0], x.device, clip_denoised, denoised_fn, model_kwargs,
                          cond_fn, eta, generator, guidance)
    if ctx.alpha[0] == 0 and sampler in NEED_NONZERO_ABAR:
        raise ValueError(
            f"the {sampler} sampler steps in x / sqrt(abar), undefined at the first timestep where abar = 0 "
            "(zero terminal SNR); use ddpm, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc"
        )
    yield from walk(lambda x, k: step(ctx, x, k), x, ctx.num_steps, progress)


def _guidance(model, model_kwargs, scale, interval, null_label):
    """A ClassifierFreeGuidance for these arguments (None for scale 1 and no interval), or a clear error."""
    if scale == 1 and interval is None:
        return None
    if (model_kwargs or {}).get("y") is None:
        raise ValueError("classifier-free guidance needs the class labels in model_kwargs['y']")
    null_label = null_label_of(model) if null_label is None else null_label
    if null_label is None:
        raise ValueError(
            "classifier-free guidance needs the model's null label: pass null_label=, or use a model trained "
            "with --class_dropout_prob > 0 (its last label embedding is the null label)"
        )
    return ClassifierFreeGuidance(model, scale, null_label, interval)
