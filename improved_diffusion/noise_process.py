"""
Noise processes: the one interface every sampler of samplers.py walks,
whatever the model was trained as (SPEC 18). GaussianDiffusion (the DDPM
family, at integer or fractional timesteps), EDMDiffusion and FlowDiffusion
implement it; a new objective is one more module that does.

The math, once (in the notation of DPM-Solver, Lu et al. 2022a, 2022b).

A noise process is a Gaussian path: at noise level (alpha, sigma) the data x_0 is seen as

    x = alpha x_0 + sigma eps,   eps ~ N(0, I),

    DDPM family:    alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t);
    EDM:            alpha = 1, sigma = sigma (Karras et al. 2022);
    flow matching:  alpha = 1 - t, sigma = t (Liu et al. 2023, Lipman et al. 2023).

lambda = log(alpha / sigma) is half the log signal-to-noise ratio: -inf at pure
noise, +inf at clean data. A sampler walks the nodes k = 0 ... N-1 of a
`Nodes`, noisiest first, and ends at node N, alpha = 1, sigma = 0: the clean
sample. The denoiser at node k turns the model's output into
(eps_hat, x0_hat), with x = alpha x0_hat + sigma eps_hat:

 1. the model is called as its process calls it (the timestep or noise-level
    input, EDM's input scaling), and learned-variance channels are dropped;
 2. its output (eps, x_0, v or x_{t-1}; EDM's F; the flow's velocity u) gives
    x0_hat by the process's own formula; denoised_fn, then clipping to
    [-1, 1], act on x0_hat, and eps_hat = (x - alpha x0_hat) / sigma. (A model
    that predicts eps, with neither: eps_hat is its output and
    x0_hat = (x - sigma eps_hat) / alpha.)
 3. classifier guidance, score form (Dhariwal & Nichol 2021, Algorithm 2): the
    score of x is -eps_hat / sigma, so adding grad_x log p(y | x) to it is
        eps_hat <- eps_hat - sigma grad_x log p(y | x),   x0_hat <- (x - sigma eps_hat) / alpha.
    Where alpha = 0, x is pure noise, independent of x_0 and so of y: the
    gradient is 0 and nothing changes.
 4. classifier-free guidance (Ho & Salimans 2022, eq. 6), out_u + s (out_c - out_u),
    mixes the model's raw outputs before step 2: every output above is affine
    in (eps_hat, x0_hat), so the mix means the same for every process.

The probability-flow ODE, solved exactly for the path (Lu et al. 2022b, eq. 9):

    x_t = (sigma_t / sigma_s) x_s + sigma_t integral_{lambda_s}^{lambda_t} e^lambda x0_hat(lambda) dlambda,

which the multistep solvers approximate with polynomials of x0_hat in lambda
over each step h = lambda_{k+1} - lambda_k. Euler, Heun and PLMS step instead
in coordinates (y = x / s, tau) in which the path is affine in tau for fixed
(x_0, eps): y = A(tau) x_0 + tau eps with A(0) = 1, so that
x0_hat = y - tau dy/dtau:

    "karras" (DDPM family, EDM): s = alpha, tau = sigma / alpha, A = 1:
        dy/dtau = eps_hat (Karras et al. 2022, eq. 4 with s(t) = alpha);
    "linear" (flow): s = alpha + sigma, tau = sigma / (alpha + sigma), A = 1 - tau:
        dy/dtau = eps_hat - x0_hat (the flow's velocity, finite at pure noise where alpha = 0).

In both an Euler step is exact for a constant (x0_hat, eps_hat): Euler's
method is DDIM (Karras et al. 2022, section 4). DDIM (Song et al. 2020, eqs.
12 and 16) from node (alpha, sigma) to (alpha', sigma'), with noise scale eta:

    x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,   c = eta sigma' sqrt(1 - e^{-2h});

eta = 1 draws from the path's posterior q(x' | x, x_0 = x0_hat): the
ancestral step (DDPM's, for the DDPM family with fixed variances).
"""

import copy
import math

import numpy as np
import torch

ODE_COORDINATES = ("karras", "linear")


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


def model_device(model):
    """The device of the model's first parameter; the CPU for a parameterless callable."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def combine(*terms):
    """sum_i c_i * tensor_i for (float c_i, tensor_i) pairs, one kernel per term; zero weights skipped."""
    terms = [(c, tensor) for c, tensor in terms if c != 0]
    out = terms[0][1] * terms[0][0]
    for c, tensor in terms[1:]:
        out.add_(tensor, alpha=c)
    return out


def per_sample(values, x):
    """A per-sample [N] tensor shaped [N x 1 x ...] to broadcast against x ([N x ...])."""
    return values.view(-1, *([1] * (x.ndim - 1)))


def noise_for(x_start, noise=None, generator=None):
    """
    The standard normal noise of x_start ([N x C x ...]): `noise` itself
    (which must have x_start's shape), or a draw from `generator`.
    """
    if noise is None:
        return noise_like(x_start.shape, x_start.device, generator, x_start.dtype)
    if noise.shape != x_start.shape:
        raise ValueError(f"noise shape {list(noise.shape)} != x_start shape {list(x_start.shape)}")
    return noise


def as_levels(value, x, name="noise levels"):
    """
    A float or an [N] tensor of noise levels (timesteps, sigmas, times) as an
    [N] tensor in x's dtype and on its device; `name` names them in the error
    for a tensor of another length.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        if value.shape[0] != x.shape[0]:
            raise ValueError(f"got {value.shape[0]} {name} for a batch of {x.shape[0]}")
        return value.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def process_xstart(pred_xstart, clip_denoised, denoised_fn):
    """x0_hat after denoised_fn, then clamped to [-1, 1] when clip_denoised (step 2 of the docstring)."""
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    return pred_xstart


def condition_eps(eps, sigma, gradient):
    """Classifier guidance on the score (Dhariwal & Nichol 2021, Algorithm 2): eps - sigma grad log p(y | x)."""
    return eps - sigma * gradient


def ddim_update(pred_xstart, eps, alpha_next, variance_next, noise_std=0.0, noise=None):
    """
    DDIM's update (Song et al. 2020, eq. 12): alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z.

    :param pred_xstart, eps: [N x C x ...] x0_hat and eps_hat at the current node.
    :param alpha_next, variance_next: alpha' and sigma'^2 of the next node, Python
        floats or tensors that broadcast against x.
    :param noise_std: c (a float or such a tensor); noise: z, or None to add none.
    """
    if isinstance(alpha_next, torch.Tensor) or isinstance(variance_next, torch.Tensor) or \
            isinstance(noise_std, torch.Tensor):
        sample = pred_xstart * alpha_next + torch.sqrt(variance_next - noise_std**2) * eps
        return sample if noise is None else sample + noise_std * noise
    terms = [(alpha_next, pred_xstart), (math.sqrt(max(variance_next - noise_std**2, 0.0)), eps)]
    return combine(*terms, *([(noise_std, noise)] if noise is not None else []))


class Nodes:
    """
    The nodes a sampler walks, noisiest first: k = 0 ... N-1 are evaluated and
    node N is the clean sample (alpha = 1, sigma = 0). Everything here is a
    Python float or int, made before the walk; timesteps_on makes the one device
    tensor a walk reads.

    :param alpha, sigma: N + 1 values each (the last 1 and 0), x = alpha x_0 + sigma eps.
    :param times: N values, the process's own time at each node, which
        guidance_interval compares against: base timesteps for the DDPM family,
        sigma for EDM, t for flow.
    :param timesteps: N values, the timesteps argument the process's methods
        take at each node (call_model, model_output, pred_xstart_from_output):
        a GaussianDiffusion's own indices, EDM's sigma, the flow's t.
    :param coordinates: "karras" or "linear": where euler, heun and plms step
        (see the module docstring).
    :param lam: N + 1 values of lambda, when the process computes them its own way.
    :param prior_std: the standard deviation of x at node 0: the starting noise
        is scaled by it (sigma_0 by default; 1 for the DDPM family, whose x_T
        is N(0, I) as the reference's).
    """

    def __init__(self, *, alpha, sigma, times, timesteps, coordinates="karras", lam=None, prior_std=None):
        self.alpha = [float(a) for a in alpha]
        self.sigma = [float(s) for s in sigma]
        self.num_steps = len(self.alpha) - 1
        if len(self.sigma) != self.num_steps + 1 or len(times) != self.num_steps or len(timesteps) != self.num_steps:
            raise ValueError(
                f"nodes need N + 1 alphas and sigmas and N times and timesteps; got {len(self.alpha)}, "
                f"{len(self.sigma)}, {len(times)} and {len(timesteps)}"
            )
        if self.num_steps < 1 or self.alpha[-1] != 1.0 or self.sigma[-1] != 0.0:
            raise ValueError("a walk has at least one node and ends at the clean sample, alpha = 1 and sigma = 0")
        if coordinates not in ODE_COORDINATES:
            raise ValueError(f"coordinates must be one of {', '.join(ODE_COORDINATES)}, got {coordinates!r}")
        alpha, sigma = np.array(self.alpha), np.array(self.sigma)
        with np.errstate(divide="ignore"):
            self.lam = (np.log(alpha) - np.log(sigma) if lam is None else np.asarray(lam, dtype=np.float64)).tolist()
            scale = alpha if coordinates == "karras" else alpha + sigma
            self.scale = scale.tolist()
            self.tau = (sigma / scale).tolist()
        self.x0_rate = 0.0 if coordinates == "karras" else -1.0
        self.coordinates = coordinates
        self.times = list(times)
        self.timesteps = list(timesteps)
        self.integral = all(isinstance(t, (int, np.integer)) for t in self.timesteps)
        self.prior_std = self.sigma[0] if prior_std is None else float(prior_std)
        self._tensors = {}

    def h(self, k):
        """lambda_{k+1} - lambda_k (inf for the step to the clean sample)."""
        return self.lam[k + 1] - self.lam[k]

    def from_node(self, start):
        """The walk of these nodes from node `start` on: Nodes of N - start steps (the same prior_std)."""
        return Nodes(alpha=self.alpha[start:], sigma=self.sigma[start:], times=self.times[start:],
                     timesteps=self.timesteps[start:], coordinates=self.coordinates, lam=self.lam[start:],
                     prior_std=self.prior_std)

    def timesteps_on(self, device, dtype=torch.float32):
        """The N timesteps as a tensor on `device`: int64 when they are ints, else `dtype`; made once per device."""
        key = (str(device), torch.int64 if self.integral else dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.timesteps, dtype=key[1], device=device)
        return self._tensors[key]


class ClassifierFreeGuidance:
    """
    Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = out_u + s (out_c - out_u)
    on the mean channels, out_c and out_u from one forward of the doubled batch
    [x, x] with labels [y, null_label]; learned-variance channels from the
    conditional half. The combination is affine, so it is the same whichever
    the model predicts (eps, x0, v, x_{t-1}, EDM's F, a flow's velocity).
    Scale 1 is the conditional model and scale 0 the unconditional one, each
    called alone.

    :param model: called as model(x, t, y=labels, **kwargs).
    :param scale: the guidance scale s.
    :param null_label: the label meaning "no class" (a UNet's null_label, index num_classes).
    :param interval: (lo, hi): guide only where the process's time lies in
        [lo, hi] (Kynkaanniemi et al. 2024; base timesteps for the DDPM family,
        sigma for EDM, t for flow), evaluating the conditional half alone elsewhere.
    """

    def __init__(self, model, scale, null_label, interval=None):
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.interval = interval

    def at(self, time):
        """The callable to use at this process time (a Python number: no device read)."""
        inside = self.interval is None or self.interval[0] <= time <= self.interval[1]
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


def classifier_free_guidance(model, model_kwargs, scale=1.0, interval=None, null_label=None):
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


class Denoiser:
    """
    The denoiser of one sampling run (steps 1-4 of the module docstring): the
    model, classifier-free guidance, what acts on x0_hat and classifier
    guidance, over any NoiseProcess.

    :param process: the NoiseProcess whose model this is.
    :param model: called as the process calls it (see its call_model).
    :param cond_fn: classifier guidance: called as the model is, it returns the
        gradient of log p(y | input) with respect to its input.
    :param guidance: a ClassifierFreeGuidance, or None.
    """

    def __init__(self, process, model, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, cond_fn=None,
                 guidance=None):
        self.process = process
        self.model = model
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.model_kwargs = model_kwargs
        self.cond_fn = cond_fn
        self.guidance = guidance

    def model_at(self, time):
        """The model to evaluate at this process time: guided where the guidance applies, else the model itself."""
        return self.model if self.guidance is None else self.guidance.at(time)

    def denoised_fn_at(self, nodes, k):
        """What acts on x0_hat at node k of `nodes` (denoised_fn, the same at every node here), or None."""
        return self.denoised_fn

    def __call__(self, x, nodes, k, t):
        """
        (eps_hat, x0_hat), each [N x C x ...], at node k of `nodes` for x
        [N x C x ...]; t is the process's [N] timesteps tensor there.
        """
        process = self.process
        alpha, sigma = nodes.alpha[k], nodes.sigma[k]
        if alpha == 0 and process.predicts_eps:
            raise ValueError(
                f"abar = 0 at timestep {k} of the walk (zero terminal SNR): eps-hat alone cannot give x0-hat "
                "there; use a model that predicts x_0 (or drop that timestep from the respacing)"
            )
        output = process.model_output(self.model_at(nodes.times[k]), x, t, self.model_kwargs)
        denoised_fn = self.denoised_fn_at(nodes, k)
        if process.predicts_eps and denoised_fn is None and not self.clip_denoised:
            eps = output
            pred_xstart = combine((1 / alpha, x), (-sigma / alpha, eps))
        else:
            raw = process.pred_xstart_from_output(output, x, t)
            pred_xstart = process_xstart(raw, self.clip_denoised, denoised_fn)
            eps = combine((1 / sigma, x), (-alpha / sigma, pred_xstart))
        if self.cond_fn is not None and alpha != 0:
            eps = condition_eps(eps, sigma, process.condition_gradient(self.cond_fn, x, t, self.model_kwargs))
            pred_xstart = combine((1 / alpha, x), (-sigma / alpha, eps))
        return eps, pred_xstart


class NoiseProcess:
    """
    The interface a sampler walks. A process provides

      - sampling_nodes(...) -> Nodes: the walk (its default one without arguments);
      - call_model(model, x, t, model_kwargs=None): the model called as this
        process calls it at timesteps t ([N], the Nodes' timesteps);
      - model_output(model, x, t, model_kwargs=None): that output's prediction
        channels, [N x C x ...] (learned-variance channels dropped, shape checked);
      - pred_xstart_from_output(output, x, t): x0_hat from them, before
        denoised_fn and clipping;
      - predicts_eps: True when the prediction channels are eps_hat itself;
      - for training, training_losses_at(model, x_start, levels, ...) (the
        process's loss at given noise levels) and noise_level_quartile(levels)
        (which quarter of the training distribution each level lies in, for
        the logs). The continuous processes (EDM, flow) also draw their own
        training levels (sample_training_levels); the DDPM family's come from
        resample.py's schedule samplers.

    It inherits here the denoiser's classifier gradient, the DDIM and
    ancestral steps, the starting noise, the shape check of the model's
    output, denoise and with_nodes; it may replace any of them with its own
    arithmetic (GaussianDiffusion keeps the reference's numbers that way).
    """

    predicts_eps = False
    # What the network outputs, for the error on an output of the wrong shape.
    output_name = "a prediction"

    def sampling_nodes(self):
        raise NotImplementedError

    def call_model(self, model, x, t, model_kwargs=None):
        raise NotImplementedError

    def model_output(self, model, x, t, model_kwargs=None):
        """
        call_model's output, [N x C x ...], which must have x's shape (a
        process whose network learns no variance); a clear error otherwise.
        """
        output = self.call_model(model, x, t, model_kwargs)
        if output.shape != x.shape:
            raise ValueError(
                f"the model returned shape {list(output.shape)} for input {list(x.shape)}: the network outputs "
                f"{self.output_name} with the data's channels and learns no variance (build it with "
                "--learn_sigma False)"
            )
        return output

    def pred_xstart_from_output(self, output, x, t):
        raise NotImplementedError

    def with_nodes(self, timestep_respacing):
        """
        A copy of this process whose default nodes are `timestep_respacing`
        (a spelling, or a list of its nodes), checked now. For the processes
        that keep their nodes in `timestep_respacing` (EDM, flow).
        """
        process = copy.copy(self)
        process.timestep_respacing = timestep_respacing
        process.sampling_nodes()
        return process

    def training_losses_at(self, model, x_start, levels, model_kwargs=None, generator=None):
        """
        The process's training losses of x_start ([N x C x ...]) at the [N] noise
        levels `levels` (its timesteps t, or sigma for EDM), the noise drawn
        from `generator`: dict of [N] tensors, "loss" among them.
        """
        raise NotImplementedError

    def noise_level_quartile(self, levels):
        """Which quarter of the training distribution each of the [N] levels lies in: int64 [N], 0 = least noise."""
        raise NotImplementedError

    def condition_gradient(self, cond_fn, x, t, model_kwargs=None):
        """grad_x log p(y | x) at timesteps t: cond_fn called as the model is."""
        return self.call_model(cond_fn, x, t, model_kwargs)

    def ddim_step(self, denoiser, x, nodes, k, t, eta=0.0, generator=None):
        """
        x at node k+1 from x at node k by DDIM with noise scale eta (the module
        docstring's update; c = 0 at the step to the clean sample).

        :param denoiser: the run's Denoiser; t: the [N] timesteps at node k.
        :return: dict with "sample" and "pred_xstart", [N x C x ...] each.
        """
        eps, pred_xstart = denoiser(x, nodes, k, t)
        sigma_next = nodes.sigma[k + 1]
        # DDIM eq. 16 for any Gaussian path: c = eta sigma' sqrt(1 - e^{-2h}).
        noise_std = eta * sigma_next * math.sqrt(-math.expm1(-2 * nodes.h(k))) if eta != 0 else 0.0
        noise = noise_like(x.shape, x.device, generator, x.dtype) if noise_std != 0 else None
        sample = ddim_update(pred_xstart, eps, nodes.alpha[k + 1], sigma_next**2, noise_std, noise)
        return {"sample": sample, "pred_xstart": pred_xstart}

    def ancestral_step(self, denoiser, x, nodes, k, t, generator=None):
        """x at node k+1 drawn from the posterior q(x' | x, x_0 = x0_hat) of the path: DDIM with eta = 1."""
        return self.ddim_step(denoiser, x, nodes, k, t, eta=1.0, generator=generator)

    def initial_noise(self, model, shape, noise=None, device=None, generator=None):
        """
        The walk's standard normal starting noise: `noise` moved to the device
        (it must have `shape`), or a draw from `generator`.

        :param device: defaults to the model's.
        """
        if device is None:
            device = model_device(model)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {list(noise.shape)} != requested shape {list(shape)}")
            return noise.to(device)
        return noise_like(tuple(shape), device, generator)
