"""
Samplers for any noise process (noise_process.py: a GaussianDiffusion or
SpacedDiffusion, EDMDiffusion, FlowDiffusion): DDPM, DDIM and the fast
ODE/SDE solvers that reach the same quality in far fewer model evaluations.

The math is in noise_process.py's docstring. A sampler walks the nodes
k = 0 ... N-1 of a Nodes (alpha_k, sigma_k, lambda_k = log(alpha_k / sigma_k)),
noisiest first, and ends at node N, the clean sample (alpha = 1, sigma = 0,
lambda = +inf). The step to node N has h = inf and is first order for every
solver: x = x0_hat.

Each sampler is one function `sampler(ctx, x, k)` that takes x at node k and
returns {"sample": x at node k+1, "pred_xstart": x0_hat at node k}; they share
one loop (`walk`) and the process's denoiser (`SamplingContext.denoise`). The
walk's coefficients are Python floats computed before the loop, so a step
copies nothing between host and device. The samplers read only the public
members of the process and of its Nodes.
"""

import math

import torch
from tqdm.auto import tqdm

from .noise_process import (  # noqa: F401 (ClassifierFreeGuidance, null_label_of: public names of this module)
    ClassifierFreeGuidance,
    Denoiser,
    classifier_free_guidance,
    combine,
    ddim_update,
    noise_like,
    null_label_of,
)

# Below this many steps the multistep solvers lower their order near the end
# (DPM-Solver++'s "lower_order_final").
LOWER_ORDER_FINAL_BELOW = 15


def walk_timesteps(diffusion):
    """The process's times at the nodes its default walk visits, noisiest first (base timesteps for the DDPM family)."""
    return list(diffusion.sampling_nodes().times)


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


class Churn:
    """
    EDM's stochastic sampler (Karras et al. 2022, Algorithm 2, lines 4-6):
    before step k, x += noise_std[k] z raises its noise level from node k to
    node k of `nodes` (sigma_hat_k), and the step leaves from there.

    :param nodes: the Nodes of the raised levels (the walk's own where noise_std is 0).
    :param noise_std: N floats, sqrt(sigma_hat_k^2 - sigma_k^2) S_noise.
    """

    def __init__(self, nodes, noise_std):
        self.nodes = nodes
        self.noise_std = list(noise_std)


class SamplingContext:
    """
    What a sampler step needs: the walk's nodes as Python floats, the
    process's denoiser, the noise source and a memory for multistep solvers.

    :param diffusion: the NoiseProcess whose nodes are walked.
    :param batch_size: N, the batch size of x.
    :param eta: the sampler's noise scale (DDIM's eta, the SDE solver's eta).
    :param generator: a torch.Generator, a list of one per sample, or None.
    :param guidance: a ClassifierFreeGuidance, or None.
    :param nodes: the Nodes to walk (the process's sampling_nodes() by default).
    :param churn: a Churn (EDM's Algorithm 2), or None.
    """

    def __init__(self, diffusion, model, batch_size, device, clip_denoised=True, denoised_fn=None,
                 model_kwargs=None, cond_fn=None, eta=0.0, generator=None, guidance=None, nodes=None, churn=None,
                 dtype=torch.float32):
        self.process = diffusion
        self.nodes = diffusion.sampling_nodes() if nodes is None else nodes
        self.denoiser = Denoiser(diffusion, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs, cond_fn=cond_fn, guidance=guidance)
        self.clip_denoised = clip_denoised
        self.eta = eta
        self.generator = generator
        self.churn = churn
        self.num_steps = self.nodes.num_steps
        self.alpha, self.sigma, self.lam = self.nodes.alpha, self.nodes.sigma, self.nodes.lam
        self.batch_size = batch_size
        self.device, self.dtype = device, dtype
        self.memory = {}

    def t(self, k, nodes=None):
        """The process's timesteps at node k of `nodes` (the walk's by default), [N] on the device (Nodes' cache)."""
        return (nodes or self.nodes).timesteps_on(self.device, self.dtype)[k].expand(self.batch_size)

    def is_last(self, k):
        return k == self.num_steps - 1

    def h(self, k):
        """lambda_{k+1} - lambda_k (inf for the step to the clean sample)."""
        return self.nodes.h(k)

    def noise(self, x):
        return noise_like(x.shape, x.device, self.generator, x.dtype)

    def denoise(self, x, k, nodes=None):
        """(eps_hat, x0_hat) at node k of `nodes` (the walk's by default): noise_process.Denoiser."""
        nodes = nodes or self.nodes
        return self.denoiser(x, nodes, k, self.t(k, nodes))

    def slope(self, eps, pred_xstart):
        """dy/dtau in the walk's ODE coordinates: eps_hat ("karras"), eps_hat - x0_hat ("linear")."""
        if self.nodes.x0_rate == 0:
            return eps
        return combine((1.0, eps), (self.nodes.x0_rate, pred_xstart))

    def churned(self, x, k):
        """(x, the Nodes step k leaves from): with a Churn, x raised to sigma_hat_k first (Algorithm 2)."""
        if self.churn is None:
            return x, self.nodes
        std = self.churn.noise_std[k]
        return (x + std * self.noise(x) if std != 0 else x), self.churn.nodes

    def transfer(self, x, slope, k):
        """
        x at node k+1 along the DDIM path of this slope: x0_hat = y - tau slope
        (clipped when clip_denoised) and the eps_hat it implies, through DDIM's
        update with eta = 0.
        """
        nodes = self.nodes
        pred_xstart = combine((1 / nodes.scale[k], x), (-nodes.tau[k], slope))
        if self.clip_denoised:
            pred_xstart = pred_xstart.clamp_(-1, 1)
        a, s = nodes.alpha[k], nodes.sigma[k]
        eps = combine((1 / s, x), (-a / s, pred_xstart))
        return ddim_update(pred_xstart, eps, nodes.alpha[k + 1], nodes.sigma[k + 1] ** 2)

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


def _remember(ctx, key, value, keep):
    """Append value to ctx.memory[key], keeping the last `keep`; return the list (oldest first)."""
    history = ctx.memory.setdefault(key, [])
    history.append(value)
    del history[:-keep]
    return history


# ---------------------------------------------------------------- samplers


def ddpm(ctx, x, k):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): the process's ancestral_step (p_sample for the DDPM family)."""
    return ctx.process.ancestral_step(ctx.denoiser, x, ctx.nodes, k, ctx.t(k), generator=ctx.generator)


def ddim(ctx, x, k):
    """DDIM (Song et al. 2020, eq. 12) with ctx.eta: the process's ddim_step (ddim_sample for the DDPM family)."""
    return ctx.process.ddim_step(ctx.denoiser, x, ctx.nodes, k, ctx.t(k), eta=ctx.eta, generator=ctx.generator)


def euler(ctx, x, k):
    """
    Euler's method on dy/dtau (Karras et al. 2022, Algorithm 1 without its
    Heun correction); the same path as DDIM with eta = 0. With a Churn,
    Algorithm 2's noise increase comes first.
    """
    x, start = ctx.churned(x, k)
    eps, pred_xstart = ctx.denoise(x, k, start)
    return {"sample": _euler_step(ctx, x, ctx.slope(eps, pred_xstart), k, start), "pred_xstart": pred_xstart}


def _euler_step(ctx, x, slope, k, start=None):
    """s_{k+1} (x / s_k + (tau_{k+1} - tau_k) slope) from node k of `start` (the walk's by default), [N x C x ...]."""
    start = start or ctx.nodes
    scale, scale_next = start.scale[k], ctx.nodes.scale[k + 1]
    return combine((scale_next / scale, x), (scale_next * (ctx.nodes.tau[k + 1] - start.tau[k]), slope))


def heun(ctx, x, k):
    """
    Heun's second-order method on the same ODE (Karras et al. 2022, Algorithm 1,
    deterministic; with a Churn, Algorithm 2): an Euler step, then the
    trapezoid of the slopes at both ends. Two model evaluations per step, one
    for the step to the clean sample.
    """
    x, start = ctx.churned(x, k)
    eps, pred_xstart = ctx.denoise(x, k, start)
    slope = ctx.slope(eps, pred_xstart)
    x_next = _euler_step(ctx, x, slope, k, start)
    if not ctx.is_last(k):
        slope_next = ctx.slope(*ctx.denoise(x_next, k + 1))
        x_next = _euler_step(ctx, x, combine((0.5, slope), (0.5, slope_next)), k, start)
    return {"sample": x_next, "pred_xstart": pred_xstart}


# Adams-Bashforth weights of the newest slope first, by how many past slopes exist.
_ADAMS_BASHFORTH = {1: (1.5, -0.5), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms(ctx, x, k):
    """
    Pseudo linear multistep (Liu et al. 2022, PNDM, section 3): the DDIM
    transfer with an Adams-Bashforth combination of the last four slopes
    (eps-hats in "karras" coordinates). The warm-up is the paper's pseudo
    improved Euler step (S-PNDM): the first step evaluates the model twice, the
    next two use orders 2 and 3, so N steps cost N + 1 evaluations (N >= 2).
    """
    eps, pred_xstart = ctx.denoise(x, k)
    slope = ctx.slope(eps, pred_xstart)
    past = ctx.memory.get("slope", [])
    if not past and not ctx.is_last(k):
        slope_next = ctx.slope(*ctx.denoise(ctx.transfer(x, slope, k), k + 1))
        combined = combine((0.5, slope), (0.5, slope_next))
    elif not past:
        combined = slope
    else:
        weights = _ADAMS_BASHFORTH[len(past)]
        combined = combine(*zip(weights, [slope, *reversed(past)]))
    _remember(ctx, "slope", slope, keep=3)
    return {"sample": ctx.transfer(x, combined, k), "pred_xstart": pred_xstart}


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

# Samplers that step in y = x / s (s = alpha in "karras" coordinates), which no s = 0 node allows.
NEED_NONZERO_ABAR = ("euler", "heun", "plms")
# Samplers that read ctx.eta, with their default noise scale.
ETA_DEFAULTS = {"ddim": 0.0, "dpmpp_2m_sde": 1.0}
# Samplers that draw noise at every step (and so read `generator` after x_T).
STOCHASTIC = ("ddpm", "ddim", "dpmpp_2m_sde")
# Samplers that take EDM's Algorithm 2 noise increase (a Churn).
CHURN_SAMPLERS = ("euler", "heun")


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


def last_sample(steps):
    """The "sample" of the last dict a sample_loop_progressive yields: the clean [N x C x ...] samples."""
    final = None
    for final in steps:
        pass
    return final["sample"]


def resolve_eta(sampler, eta):
    """The sampler's noise scale: `eta`, or its default (ETA_DEFAULTS) when None; an error for one it ignores."""
    if eta is None:
        return ETA_DEFAULTS.get(sampler, 0.0)
    if eta != 0 and sampler not in ETA_DEFAULTS:
        raise ValueError(f"eta={eta} applies only to the samplers {', '.join(ETA_DEFAULTS)}; {sampler!r} ignores it")
    return eta


def check_first_node(sampler, nodes):
    """An error when `sampler` steps in x / alpha and the walk starts where alpha = 0 (zero terminal SNR)."""
    if nodes.scale[0] == 0 and sampler in NEED_NONZERO_ABAR:
        raise ValueError(
            f"the {sampler} sampler steps in x / sqrt(abar), undefined at the first timestep where abar = 0 "
            "(zero terminal SNR); use ddpm, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc"
        )


def starting_x(diffusion, model, shape, nodes, noise=None, device=None, generator=None):
    """x at the first node: the process's standard normal starting noise times nodes.prior_std."""
    x = diffusion.initial_noise(model, shape, noise=noise, device=device, generator=generator)
    return x * nodes.prior_std if nodes.prior_std != 1 else x


def sample_loop_progressive(diffusion, model, shape, sampler="ddim", noise=None, clip_denoised=True,
                            denoised_fn=None, model_kwargs=None, device=None, progress=False, eta=None,
                            generator=None, cond_fn=None, guidance_scale=1.0, guidance_interval=None,
                            null_label=None, *, nodes=None, churn=None):
    """
    Walk a process's nodes from the noisiest down with the named sampler,
    yielding each step's {"sample", "pred_xstart"}; the last "sample" is clean.

    :param diffusion: a NoiseProcess.
    :param shape: the [N x C x ...] shape of the samples; noise, optional
        standard normal noise of it (x at node 0 is noise times nodes.prior_std).
    :param eta: the noise scale of "ddim" and "dpmpp_2m_sde" (None: 0 and 1);
        another sampler given a nonzero eta is an error.
    :param cond_fn: classifier guidance, called as the model is (see the
        process's call_model) with model_kwargs, returning the gradient of
        log p(y | input) with respect to its input.
    :param guidance_scale: classifier-free guidance scale (1: none), with the
        labels in model_kwargs["y"] and `null_label` (default: the UNet's
        null_label, index num_classes) meaning no class; guidance_interval (lo, hi) limits
        it to those process times (see ClassifierFreeGuidance).
    :param nodes: the Nodes to walk; the process's sampling_nodes() by default.
    :param churn: a Churn (EDM's Algorithm 2), for the euler and heun samplers.
    """
    step = get_sampler(sampler)
    eta = resolve_eta(sampler, eta)
    if churn is not None and sampler not in CHURN_SAMPLERS:
        raise ValueError(
            f"s_churn > 0 (Karras et al.'s Algorithm 2) raises the noise before steps of "
            f"{' or '.join(CHURN_SAMPLERS)}, not of {sampler!r}: use sampler='heun' or drop s_churn"
        )
    guidance = classifier_free_guidance(model, model_kwargs, scale=guidance_scale, interval=guidance_interval,
                                        null_label=null_label)
    nodes = diffusion.sampling_nodes() if nodes is None else nodes
    x = starting_x(diffusion, model, shape, nodes, noise=noise, device=device, generator=generator)
    ctx = SamplingContext(diffusion, model, x.shape[0], x.device, clip_denoised=clip_denoised,
                          denoised_fn=denoised_fn, model_kwargs=model_kwargs, cond_fn=cond_fn, eta=eta,
                          generator=generator, guidance=guidance, nodes=nodes, churn=churn, dtype=x.dtype)
    check_first_node(sampler, nodes)
    yield from walk(lambda x, k: step(ctx, x, k), x, ctx.num_steps, progress)
