"""
The pieces between the objective flags and the processes (SPEC 16, 18): the
flag table's objectives and per-objective defaults, diffusion_from_flags'
dispatch, the training noise levels of a continuous process, and the default
nodes an EDM or flow process is built with.
"""

import json

import pytest
import torch

from improved_diffusion import flags as flag_table
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.errors import UsageError
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.gaussian_diffusion import GaussianDiffusion
from improved_diffusion.resample import ProcessLevelSampler, UniformSampler, create_named_schedule_sampler
from improved_diffusion.script_util import create_model_and_diffusion, diffusion_from_flags, model_and_diffusion_defaults


def test_every_objective_flag_names_only_known_objectives_and_each_objective_has_its_own():
    assert flag_table.objective_flags("edm") == ["sigma_data", "sigma_min", "sigma_max", "P_mean", "P_std"]
    assert flag_table.objective_flags("flow") == ["logit_mean", "logit_std", "time_sampling"]
    assert {"diffusion_steps", "noise_schedule", "learn_sigma", "schedule_sampler", "continuous_timesteps"} <= set(
        flag_table.objective_flags("ddpm"))
    shared = [name for name, flag in flag_table.FLAGS.items() if flag.objectives is None]
    assert {"timestep_respacing", "sampler", "objective", "image_size", "lr"} <= set(shared)
    with pytest.raises(ValueError, match="objectives must be among"):
        flag_table.Flag("x", 0, flag_table.TRAINING, "TRAIN", "a flag", objectives=("vdm",))


def test_a_flag_of_another_objective_is_named_in_one_error():
    flag_table.check_objective("edm", {"sigma_data", "lr", "timestep_respacing"})
    with pytest.raises(UsageError) as info:
        flag_table.check_objective("edm", {"lr", "predict_v", "diffusion_steps", "logit_std"})
    assert str(info.value).startswith("--diffusion_steps, --predict_v, --logit_std do not apply to --objective edm")
    assert "--sigma_data, --sigma_min, --sigma_max, --P_mean, --P_std" in str(info.value)
    with pytest.raises(UsageError, match="--sigma_max does not apply to the run's edm"):
        flag_table.check_objective("ddpm", {"sigma_max"}, source="the run's edm")


def test_per_objective_defaults_replace_only_flags_left_at_the_table_s_default():
    values = {"eval_sampler": "ddim", "eval_timestep_respacing": "ddim25", "sampler": "", "lr": 1e-4}
    flag_table.apply_objective_defaults(values, explicit=set(), objective="edm")
    assert values == {"eval_sampler": "heun", "eval_timestep_respacing": "karras13", "sampler": "heun", "lr": 1e-4}
    values = {"eval_sampler": "ddim", "eval_timestep_respacing": "ddim25", "sampler": "dpmpp_2m"}
    flag_table.apply_objective_defaults(values, explicit={"eval_sampler"}, objective="flow")
    # A given flag, and a script's own default (search_timesteps' dpmpp_2m), stay.
    assert values == {"eval_sampler": "ddim", "eval_timestep_respacing": "uniform25", "sampler": "dpmpp_2m"}
    values = {"eval_sampler": "ddim"}
    assert flag_table.apply_objective_defaults(values, set(), "ddpm") == {"eval_sampler": "ddim"}


def test_diffusion_from_flags_builds_the_objective_s_process_from_its_flags():
    flags = dict(model_and_diffusion_defaults(), objective="edm", sigma_data=0.7, sigma_min=0.01, sigma_max=40.0,
                 P_mean=-0.5, P_std=1.5, timestep_respacing="karras7")
    edm = diffusion_from_flags(flags)
    assert isinstance(edm, EDMDiffusion)
    assert (edm.sigma_data, edm.sigma_min, edm.sigma_max, edm.P_mean, edm.P_std) == (0.7, 0.01, 40.0, -0.5, 1.5)
    assert edm.sampling_sigmas() == edm.sampling_sigmas("karras7") and len(edm.sampling_sigmas()) == 7
    flow = diffusion_from_flags(dict(flags, objective="flow", logit_mean=0.5, logit_std=0.7, time_sampling="uniform",
                                     timestep_respacing=""))
    assert isinstance(flow, FlowDiffusion)
    assert (flow.logit_mean, flow.logit_std, flow.time_sampling) == (0.5, 0.7, "uniform")
    assert len(flow.sampling_times()) == 50
    assert isinstance(diffusion_from_flags(dict(flags, objective="ddpm", timestep_respacing="")), GaussianDiffusion)
    with pytest.raises(ValueError, match="--learn_sigma True: the edm objective learns no variance"):
        diffusion_from_flags(dict(flags, learn_sigma=True))
    with pytest.raises(ValueError, match="'ddim7'"):
        diffusion_from_flags(dict(flags, timestep_respacing="ddim7"))


def test_create_model_and_diffusion_takes_the_objective_as_a_keyword():
    flags = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
                 attention_resolutions="")
    model, flow = create_model_and_diffusion(**flags, objective="flow")
    assert isinstance(flow, FlowDiffusion) and model.out_channels == 3
    _, ddpm = create_model_and_diffusion(**flags)
    assert isinstance(ddpm, GaussianDiffusion)


def test_continuous_timesteps_without_a_spacing_keep_every_integer_timestep():
    flags = dict(model_and_diffusion_defaults(), diffusion_steps=20, continuous_timesteps=True)
    assert diffusion_from_flags(flags).timestep_map == diffusion_from_flags(
        dict(flags, continuous_timesteps=False)).timestep_map
    spaced = diffusion_from_flags(dict(flags, timestep_respacing="logsnr5"))
    assert any(float(t) != int(t) for t in spaced.timestep_map)


@pytest.mark.parametrize("process, draw", [
    (EDMDiffusion(P_mean=-0.3), "sample_sigma"),
    (FlowDiffusion(logit_std=0.6), "sample_t"),
])
def test_a_continuous_process_draws_its_own_training_levels_with_unit_weights(process, draw):
    sampler = create_named_schedule_sampler("uniform", process)
    assert isinstance(sampler, ProcessLevelSampler)
    levels, weights = sampler.sample(64, "cpu", generator=torch.Generator().manual_seed(3))
    expected = getattr(process, draw)(64, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(levels, expected) and torch.equal(weights, torch.ones(64))
    with pytest.raises(ValueError, match="draws its own noise levels"):
        create_named_schedule_sampler("loss-second-moment", process)
    quartile = process.noise_level_quartile(levels)
    assert quartile.dtype == torch.int64 and set(quartile.tolist()) <= {0, 1, 2, 3}


def test_a_ddpm_process_keeps_its_timestep_samplers_and_quarters_of_t():
    diffusion = diffusion_from_flags(dict(model_and_diffusion_defaults(), diffusion_steps=100))
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert diffusion.noise_level_quartile(torch.tensor([0, 24, 25, 50, 99])).tolist() == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("process, nodes", [
    (EDMDiffusion(), [0.5, 10.0, 2.0]),
    (FlowDiffusion(), [0.25, 1.0, 0.5]),
])
def test_a_process_walks_the_nodes_it_is_given(process, nodes, tmp_path):
    walked = process.with_nodes(nodes)
    assert walked.sampling_nodes().times == sorted(nodes, reverse=True)
    assert process.timestep_respacing == ""  # a copy: the process itself keeps its nodes
    spacing = tmp_path / "nodes.json"
    spacing.write_text(json.dumps(nodes))
    assert process.with_nodes(str(spacing)).sampling_nodes().times == sorted(nodes, reverse=True)
    with pytest.raises(ValueError, match="the node list"):
        process.with_nodes([-1.0, 0.5])
