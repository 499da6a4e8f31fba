"""
The noise-process interface (improved_diffusion/noise_process.py) across
processes: the denoiser, guidance (classifier and classifier-free),
clipping, denoised_fn and every sampler of SPEC 11 on EDM and flow matching,
with exact models (Gaussian mixtures) wherever the answer is known.
"""

import json
import math

import pytest
import torch

from improved_diffusion import samplers
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.mixture import GaussianMixture
from improved_diffusion.noise_process import Denoiser, Nodes, ddim_update

from diffusion_probe import ProbeModel

SMOOTH = GaussianMixture([0.3, 0.7], [[-0.4, 0.2], [0.4, -0.1]], [0.3, 0.25])
MEANS, STDS, NULL = [[-0.5, 0.0], [0.5, 0.0]], [0.1, 0.1], 2
PAIR = GaussianMixture([0.5, 0.5], MEANS, STDS)
PROCESSES = ("edm", "flow")


def process(name):
    return EDMDiffusion() if name == "edm" else FlowDiffusion()


def exact_model(name, mixture):
    return mixture.edm_model() if name == "edm" else mixture.flow_model()


def x_T(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(name, model, sampler, steps=12, **kwargs):
    """Sample with `steps` model-evaluation steps on each process's own default spacing."""
    shape = kwargs.pop("shape", None) or kwargs["noise"].shape
    return process(name).sample_loop(model, shape, sampler, steps=steps, **kwargs)


# ---------------------------------------------------------------- nodes and the denoiser


def test_nodes_are_checked():
    with pytest.raises(ValueError, match="N \\+ 1 alphas"):
        Nodes(alpha=[1.0, 1.0], sigma=[1.0, 0.0], times=[1.0, 2.0], timesteps=[1.0])
    with pytest.raises(ValueError, match="clean sample"):
        Nodes(alpha=[1.0, 1.0], sigma=[1.0, 0.5], times=[1.0], timesteps=[1.0])
    with pytest.raises(ValueError, match="karras, linear"):
        Nodes(alpha=[1.0, 1.0], sigma=[1.0, 0.0], times=[1.0], timesteps=[1.0], coordinates="sigma")


def test_the_coordinates_of_euler_heun_and_plms():
    """karras: y = x / alpha, tau = sigma / alpha; linear: y = x / (alpha + sigma), tau = sigma / (alpha + sigma)."""
    karras = Nodes(alpha=[0.6, 1.0], sigma=[0.8, 0.0], times=[5], timesteps=[0])
    assert karras.scale == [0.6, 1.0] and karras.tau == pytest.approx([0.8 / 0.6, 0.0]) and karras.x0_rate == 0
    linear = Nodes(alpha=[0.0, 0.25, 1.0], sigma=[1.0, 0.75, 0.0], times=[1.0, 0.75], timesteps=[1.0, 0.75],
                   coordinates="linear")
    assert linear.scale == [1.0, 1.0, 1.0] and linear.tau == [1.0, 0.75, 0.0] and linear.x0_rate == -1
    assert linear.lam[0] == -math.inf and linear.lam[-1] == math.inf and linear.prior_std == 1.0


@pytest.mark.parametrize("name", PROCESSES)
def test_the_denoiser_of_an_exact_model_is_the_posterior_mean(name):
    diffusion = process(name)
    nodes = diffusion.sampling_nodes(steps=6)
    denoiser = Denoiser(diffusion, exact_model(name, SMOOTH), clip_denoised=False)
    for k in range(nodes.num_steps):
        alpha, sigma = nodes.alpha[k], nodes.sigma[k]
        x = alpha * SMOOTH.sample(50, torch.Generator().manual_seed(k)) + sigma * x_T(50, k + 10)
        t = nodes.timesteps_on("cpu", torch.float64)[k].expand(50)
        eps, pred_xstart = denoiser(x, nodes, k, t)
        torch.testing.assert_close(pred_xstart, SMOOTH.denoise(x, alpha, sigma), rtol=0, atol=1e-10)
        torch.testing.assert_close(alpha * pred_xstart + sigma * eps, x, rtol=0, atol=1e-10)


def test_ddim_update_with_eta_1_is_the_posterior_of_the_path():
    """q(x' | x, x_0) for x = alpha x_0 + sigma eps (any alpha, sigma): its mean and variance in closed form."""
    alpha, sigma, alpha_next, sigma_next = 0.3, 2.0, 0.9, 0.5
    pred_xstart, eps = torch.tensor([[0.7]]), torch.tensor([[-1.3]])
    x = alpha * pred_xstart + sigma * eps
    h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
    c = sigma_next * math.sqrt(-math.expm1(-2 * h))
    # x = (alpha / alpha') x' + s z with s^2 = sigma^2 - (alpha / alpha')^2 sigma'^2, so the posterior is
    # N(((alpha / alpha') sigma'^2 x + alpha' s^2 x_0) / sigma^2, s^2 sigma'^2 / sigma^2).
    ratio = alpha / alpha_next
    s2 = sigma**2 - ratio**2 * sigma_next**2
    mean = (ratio * sigma_next**2 * x + alpha_next * s2 * pred_xstart) / sigma**2
    assert c**2 == pytest.approx(s2 * sigma_next**2 / sigma**2, rel=1e-12)
    torch.testing.assert_close(ddim_update(pred_xstart, eps, alpha_next, sigma_next**2, c, torch.zeros(1, 1)),
                               mean, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- every sampler on every process


@pytest.mark.parametrize("name", PROCESSES)
def test_euler_is_ddim_on_every_process(name):
    """An Euler step in the process's coordinates is exact for a constant (x0-hat, eps-hat): DDIM (eta = 0)."""
    noise = x_T(256)
    model = exact_model(name, SMOOTH)
    euler = run(name, model, "euler", noise=noise, clip_denoised=False)
    ddim = run(name, model, "ddim", noise=noise, clip_denoised=False)
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_ddpm_is_the_posterior_step_ddim_with_eta_1(name):
    noise = x_T(64)
    model = exact_model(name, SMOOTH)
    ancestral = run(name, model, "ddpm", noise=noise, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    eta_1 = run(name, model, "ddim", noise=noise, clip_denoised=False, eta=1.0,
                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ancestral, eta_1, rtol=0, atol=0)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_the_same_lambda_nodes_give_the_same_samples_on_every_process(tmp_path, name, sampler):
    """
    These samplers depend on the nodes only through lambda (and on x through
    x / alpha): EDM at sigma = t / (1 - t) and the flow at t walk the same
    path, from sigma_0 noise and t_0 noise, and end on the same samples.
    """
    times = [0.95, 0.8, 0.5, 0.3, 0.1, 0.04, 0.01]
    sigmas = [t / (1 - t) for t in times]
    (tmp_path / "t.json").write_text(json.dumps(times))
    (tmp_path / "sigma.json").write_text(json.dumps(sigmas))
    noise = x_T(128)
    flow = FlowDiffusion().sample_loop(SMOOTH.flow_model(), noise.shape, sampler, noise=noise, clip_denoised=False,
                                       timestep_respacing=str(tmp_path / "t.json"))
    edm = EDMDiffusion().sample_loop(SMOOTH.edm_model(), noise.shape, sampler, noise=noise, clip_denoised=False,
                                     timestep_respacing=str(tmp_path / "sigma.json"))
    torch.testing.assert_close(flow, edm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", PROCESSES)
def test_one_node_lands_on_the_denoised_start(name):
    noise = x_T(16)
    diffusion = process(name)
    sigma_0 = diffusion.sampling_nodes(steps=1).sigma[0]
    alpha_0 = diffusion.sampling_nodes(steps=1).alpha[0]
    expected = SMOOTH.denoise(noise * sigma_0, alpha_0, sigma_0)
    for sampler in samplers.SAMPLERS:
        out = diffusion.sample_loop(exact_model(name, SMOOTH), noise.shape, sampler, steps=1, noise=noise,
                                    clip_denoised=False, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10, msg=sampler)


@pytest.mark.parametrize("name", PROCESSES)
def test_model_evaluations_are_counted_as_made(name):
    model = exact_model(name, SMOOTH)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    for sampler in samplers.SAMPLERS:
        calls.clear()
        run(name, counting, sampler, steps=7, shape=(4, 2), clip_denoised=False)
        assert len(calls) == samplers.model_evaluations(sampler, 7), sampler


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_clip_and_denoised_fn_act_on_every_prediction(name, sampler):
    wide = GaussianMixture([0.5, 0.5], [[-3.0, 0.0], [3.0, 0.0]], [0.1, 0.1])
    noise = x_T(64)
    clipped = list(process(name).sample_loop_progressive(
        exact_model(name, wide), noise.shape, sampler, steps=6, noise=noise, clip_denoised=True,
        generator=torch.Generator().manual_seed(0)))
    assert all(out["pred_xstart"].abs().max() <= 1 + 1e-6 for out in clipped)
    free = run(name, exact_model(name, wide), sampler, steps=6, noise=noise, clip_denoised=False,
               generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 2
    calls = []

    def denoised_fn(x0):
        calls.append(1)
        return torch.zeros_like(x0) + 0.25

    out = run(name, exact_model(name, SMOOTH), sampler, steps=5, shape=(8, 2), clip_denoised=False,
              denoised_fn=denoised_fn, generator=torch.Generator().manual_seed(0))
    assert len(calls) == samplers.model_evaluations(sampler, 5)
    if sampler != "plms":
        torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- guidance


def component_gradient(name, x_in, timesteps):
    """grad of log p(component 1 | x) with respect to the input the process gives cond_fn (exact)."""
    with torch.enable_grad():
        x_in = x_in.detach().double().requires_grad_(True)
        if name == "edm":
            sigma = torch.exp(4 * timesteps.double()).view(-1, 1)
            # The classifier sees c_in x, as the network does.
            alpha, x = 1.0, x_in * torch.sqrt(sigma**2 + 0.25)
        else:
            sigma = (timesteps.double() / 1000).view(-1, 1)
            alpha, x = 1 - sigma, x_in
        log_p = torch.log(PAIR.path_posterior_weights(x, alpha, sigma)[:, 1]).sum()
        return torch.autograd.grad(log_p, x_in)[0]


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_cond_fn_pulls_samples_toward_the_guided_component(name, sampler):
    """cond_fn, called as the model is, returns grad log p(y | input); samples move to component 1."""
    noise = x_T(400)
    kwargs = dict(noise=noise, clip_denoised=False)
    plain = run(name, exact_model(name, PAIR), sampler, steps=25, generator=torch.Generator().manual_seed(0), **kwargs)
    guided = run(name, exact_model(name, PAIR), sampler, steps=25, generator=torch.Generator().manual_seed(0),
                 cond_fn=lambda x, t: component_gradient(name, x, t).to(x.dtype), **kwargs)
    assert (plain[:, 0] > 0).double().mean() < 0.65
    assert (guided[:, 0] > 0).double().mean() > 0.9


class ConditionalExact:
    """The exact model of component y for y < NULL, of the whole pair for y == NULL; counts its batch sizes."""

    def __init__(self, name):
        self.parts = [exact_model(name, GaussianMixture([1.0], [m], [s])) for m, s in zip(MEANS, STDS)]
        self.whole = exact_model(name, PAIR)
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        out = self.whole(x, t)
        for label, part in enumerate(self.parts):
            out = torch.where((y == label).view(-1, 1), part(x, t), out)
        return out


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "ddpm"])
def test_classifier_free_guidance_on_every_process(name, sampler):
    """One forward of the doubled batch mixes the network's outputs (EDM's F, the flow's u) as two forwards would."""
    noise, labels = x_T(400), torch.arange(400) % 2
    model = ConditionalExact(name)

    def sample(network, y, **extra):
        return run(name, network, sampler, noise=noise, clip_denoised=False, model_kwargs={"y": y}, null_label=NULL,
                   generator=torch.Generator().manual_seed(1), **extra)

    def two_forwards(x, t, y):
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
        return uncond + 3.0 * (cond - uncond)

    conditional = sample(model, labels)
    torch.testing.assert_close(sample(model, labels, guidance_scale=1.0), conditional, rtol=0, atol=0)
    torch.testing.assert_close(sample(model, labels, guidance_scale=0.0), sample(model, torch.full_like(labels, NULL)),
                               rtol=0, atol=0)
    model.batches.clear()
    guided = sample(model, labels, guidance_scale=3.0)
    assert model.batches == [800] * samplers.model_evaluations(sampler, 12), "one doubled forward per evaluation"
    torch.testing.assert_close(guided, sample(two_forwards, labels), rtol=0, atol=1e-12)
    assert (guided - conditional).abs().max() > 1e-3


@pytest.mark.parametrize("name, spacing", [("edm", "karras12"), ("flow", "logsnr12")])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_classifier_guidance_with_the_exact_posterior_is_the_class_model(name, spacing, sampler):
    """
    Score form at scale 1 on any path: eps - sigma grad log p(y | x) is the class
    component's eps exactly, with cond_fn called as the network is (EDM: on c_in x).
    (Not from t = 1, where alpha = 0: there x carries nothing of x_0 and the score no class.)
    """
    noise, labels = x_T(200), torch.arange(200) % 2

    def cond_fn(x_in, timesteps, y):
        with torch.enable_grad():
            x_in = x_in.detach().requires_grad_(True)
            if name == "edm":
                sigma = torch.exp(4 * timesteps.double()).view(-1, 1)
                alpha, x = 1.0, x_in * torch.sqrt(sigma**2 + 0.25)
            else:
                sigma = (timesteps.double() / 1000).view(-1, 1)
                alpha, x = 1 - sigma, x_in
            log_r = PAIR.path_posterior_weights(x, alpha, sigma).log()
            return torch.autograd.grad(log_r[torch.arange(len(y)), y].sum(), x_in)[0]

    kwargs = dict(noise=noise, clip_denoised=False, model_kwargs={"y": labels}, timestep_respacing=spacing)
    guided = run(name, exact_model(name, PAIR), sampler, cond_fn=cond_fn, **kwargs)
    conditional = run(name, ConditionalExact(name), sampler, **kwargs)
    torch.testing.assert_close(guided, conditional, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", PROCESSES)
def test_the_guidance_interval_is_in_the_process_time(name):
    """EDM's interval is in sigma, the flow's in t: the doubled batch runs exactly at the nodes inside it."""
    diffusion = process(name)
    times = diffusion.sampling_nodes(steps=10).times
    interval = (min(times[2:5]), max(times[2:5]))
    model = ConditionalExact(name)
    diffusion.sample_loop(model, (8, 2), "dpmpp_2m", steps=10, model_kwargs={"y": torch.arange(8) % 2},
                          guidance_scale=2.0, guidance_interval=interval, null_label=NULL)
    assert model.batches == [8, 8, 16, 16, 16, 8, 8, 8, 8, 8]


# ---------------------------------------------------------------- device discipline


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_sampling_steps_build_no_tensor_from_host_data(monkeypatch, name, sampler):
    """After the walk's setup (its first step), no step makes a tensor from host data."""
    steps = process(name).sample_loop_progressive(ProbeModel(3), (2, 3, 4, 4), sampler, steps=6,
                                                  generator=torch.Generator().manual_seed(0))
    next(steps)

    def forbidden(*args, **kwargs):
        raise AssertionError("a sampling step built a tensor from host data")

    for attribute in ("from_numpy", "tensor", "as_tensor", "full"):
        monkeypatch.setattr(torch, attribute, forbidden)
    assert len(list(steps)) == 5


# ---------------------------------------------------------------- the design


def test_the_library_import_graph_is_acyclic_and_the_samplers_know_no_process():
    """samplers.py and noise_process.py import no process module; no module imports itself back."""
    import ast
    import pathlib

    package = pathlib.Path(samplers.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = imported & {p.stem for p in package.glob("*.py")}
    processes = {"gaussian_diffusion", "respace", "edm", "flow"}
    assert not graph["samplers"] & processes and not graph["noise_process"], graph
    done, active = set(), []

    def visit(module):
        assert module not in active, f"import cycle: {' -> '.join(active + [module])}"
        if module not in done:
            active.append(module)
            for imported in graph[module]:
                visit(imported)
            active.pop()
            done.add(module)

    for module in graph:
        visit(module)
