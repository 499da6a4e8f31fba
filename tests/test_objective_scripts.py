"""
EDM and flow matching through the real scripts (SPEC 18): a tiny model of
each objective trained by image_train.py with --eval_interval, killed with
kill -9 and resumed to the same bits as the uninterrupted run; sampled by
image_sample.py from --model_path alone (its flags.json says the objective,
and the samples are the library's EDMDiffusion / FlowDiffusion samples);
and every flag that does not fit the objective refused with one `error:`
line naming it.
"""

import csv
import json

import numpy as np
import pytest
import torch
from _train_helpers import (
    assert_same_files,
    kill_group,
    run_script,
    set_names,
    start_script,
    wait_for,
    write_images,
)
from test_evaluation import random_inception
from test_flags import assert_error_line, run_main

from improved_diffusion import flags as flag_table
from improved_diffusion import image_output, sample_util
from improved_diffusion.edm import EDMDiffusion
from improved_diffusion.flow import FlowDiffusion
from improved_diffusion.io_util import load_checkpoint
from improved_diffusion.script_util import diffusion_from_flags, model_from_flags

# The network of TINY_MODEL without the DDPM-only flags (a learned variance, T, the beta schedule).
TINY_NETWORK = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": ""}
# Each objective with a few of its own flags set away from their defaults, and a short evaluation walk.
OBJECTIVES = {
    "edm": {"objective": "edm", "sigma_max": 20.0, "P_mean": -1.0, "eval_timestep_respacing": "karras3"},
    "flow": {"objective": "flow", "logit_std": 0.8, "eval_timestep_respacing": "uniform4"},
}
METRICS = ("fid", "precision", "recall")


def rows(log_dir):
    with open(log_dir / "progress.csv", newline="") as f:
        return {int(float(row["step"])): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def runs(request, tmp_path_factory):
    """
    For one objective: an uninterrupted 8-step run evaluated every 4 steps,
    one killed (kill -9) after its step-4 set, and that one resumed to step 8.
    """
    root = tmp_path_factory.mktemp(f"objective_{request.param}")
    weights = root / "random_inception.pth"
    torch.save(random_inception(seed=3).state_dict(), weights)
    flags = dict(
        TINY_NETWORK, **OBJECTIVES[request.param], data_dir=write_images(root / "images", 8), batch_size=2,
        microbatch=1, log_interval=2, save_interval=2, ema_rate="0.9", lr=3e-3, eval_interval=4,
        eval_num_samples=4, inception_weights=weights,
    )
    killed = start_script("image_train.py", dict(flags, max_steps=100000), root / "killed")
    wait_for(root / "killed" / "state000004.pt", killed, timeout=240)
    kill_group(killed)
    for name, extra in (("whole", {}), ("resumed", {"resume_checkpoint": root / "killed" / "model000004.pt"})):
        status, _, err = run_script("image_train.py", dict(flags, max_steps=8, **extra), root / name)
        assert status == 0, err
    return request.param, root


def test_the_run_records_its_objective_and_logs_loss_quartiles_of_its_noise_levels(runs):
    objective, root = runs
    saved = json.loads((root / "whole" / "flags.json").read_text())
    assert {k: saved[k] for k in OBJECTIVES[objective]} == {
        k: str(v) if k == "inception_weights" else v for k, v in OBJECTIVES[objective].items()
    }
    assert saved["eval_sampler"] == flag_table.FLAGS["eval_sampler"].default_for(objective) != "ddim"
    logged = rows(root / "whole")
    assert sorted(logged) == [2, 4, 6, 8]
    # Quartiles of the process's own training distribution: with 8 draws per row each is usually hit.
    assert sum(logged[8].get(f"mse_q{q}") not in (None, "") for q in range(4)) >= 2
    assert all(float(row["loss"]) > 0 for row in logged.values())


def test_kill_9_then_resume_gives_the_uninterrupted_run_s_files_and_metrics(runs):
    _, root = runs
    for step in (6, 8):
        assert_same_files(root / "whole", root / "resumed", set_names(step, rates=("0.9",)))
    whole, killed, resumed = rows(root / "whole"), rows(root / "killed"), rows(root / "resumed")
    for key in METRICS:
        assert whole[4][key] not in (None, "") and whole[8][key] not in (None, ""), key
        assert killed[4][key] == whole[4][key] and resumed[8][key] == whole[8][key], key
    assert (root / "whole" / "eval_samples_000008.png").is_file()


def test_model_path_alone_samples_the_objective_s_process(runs, tmp_path):
    objective, root = runs
    model_path = root / "whole" / "ema_0.9_000008.pt"
    argv = {"model_path": model_path, "num_samples": 3, "batch_size": 2, "seed": 5, "timestep_respacing": ""}
    status, out, err = run_script("image_sample.py", argv, tmp_path / "samples")
    assert status == 0, err
    samples = np.load(tmp_path / "samples" / "samples_3x8x8x3.npz")["arr_0"]
    log = (tmp_path / "samples" / "log.txt").read_text()
    sampler = flag_table.FLAGS["sampler"].default_for(objective)
    assert f"sampler {sampler} over" in log

    # The same samples from the library: the process the saved flags describe, its default sampler.
    saved = json.loads((root / "whole" / "flags.json").read_text())
    process = diffusion_from_flags(dict(saved, timestep_respacing=""))
    assert isinstance(process, {"edm": EDMDiffusion, "flow": FlowDiffusion}[objective])
    assert (process.sigma_max == 20.0) if objective == "edm" else (process.logit_std == 0.8)
    model = model_from_flags(saved)
    model.load_state_dict(load_checkpoint(model_path))
    model.eval()
    expected = [
        image_output.to_uint8_images(sample_util.draw_samples(process, model, (3, 8, 8), indices, seed=5,
                                                              sampler=sampler))
        for indices in (range(0, 2), range(2, 3))
    ]
    np.testing.assert_array_equal(samples, np.concatenate(expected))


def test_search_timesteps_writes_nodes_of_the_objective_that_image_sample_reads(runs, tmp_path):
    objective, root = runs
    model_path = root / "whole" / "ema_0.9_000008.pt"
    output = tmp_path / "nodes.json"
    argv = {"model_path": model_path, "steps": 3, "grid_size": 12, "refine_rounds": 1, "num_samples": 2,
            "batch_size": 2, "output": output}
    status, out, err = run_script("search_timesteps.py", argv, tmp_path / "search")
    assert status == 0, err
    nodes = json.loads(output.read_text())
    assert len(nodes) == 3 and all(isinstance(v, float) for v in nodes)
    status, _, err = run_script("image_sample.py", {"model_path": model_path, "num_samples": 2, "batch_size": 2,
                                                     "sampler": "dpmpp_2m", "timestep_respacing": output},
                                tmp_path / "samples")
    assert status == 0, err
    assert "sampler dpmpp_2m over 3 timesteps" in (tmp_path / "samples" / "log.txt").read_text()


# ---------------------------------------------------------------- flags that do not fit the objective


@pytest.mark.parametrize("argv, needles", [
    (["--objective", "edm", "--diffusion_steps", 10], ["--diffusion_steps does not apply to --objective edm"]),
    (["--objective", "flow", "--noise_schedule", "cosine", "--predict_v", True],
     ["--noise_schedule, --predict_v do not apply to --objective flow"]),
    (["--objective", "edm", "--schedule_sampler", "loss-second-moment"], ["--schedule_sampler", "edm"]),
    (["--objective", "edm", "--logit_std", 2], ["--logit_std does not apply to --objective edm"]),
    (["--sigma_data", 1.0], ["--sigma_data does not apply to --objective ddpm"]),
    (["--objective", "flow", "--P_std", 1.0], ["--P_std does not apply to --objective flow"]),
    (["--objective", "edm", "--sigma_min", 3, "--sigma_max", 2], ["--sigma_min", "--sigma_max"]),
    (["--objective", "edm", "--sigma_min", 0], ["--sigma_min"]),
    (["--objective", "flow", "--logit_std", 0], ["--logit_std", "> 0"]),
    (["--objective", "flow", "--logit_std", -1], ["--logit_std"]),
    (["--objective", "edm", "--eval_interval", 10, "--eval_timestep_respacing", "ddim25"], ["'ddim25'"]),
    (["--continuous_timesteps", True, "--eval_interval", 10, "--eval_timestep_respacing", "ddim25"],
     ["ddim25", "no continuous form"]),
])
def test_training_flags_that_do_not_fit_the_objective_are_usage_errors(argv, needles, tmp_path, monkeypatch,
                                                                        capsys):
    images = write_images(tmp_path / "images", 2)
    network = [x for k, v in TINY_NETWORK.items() for x in (f"--{k}", v)]
    status, _, err = run_main("image_train", ["--data_dir", images, *network, *argv], tmp_path / "log",
                              monkeypatch, capsys)
    assert_error_line(status, err, 2, *needles)
    assert not (tmp_path / "log" / "flags.json").exists()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A checkpoint of a tiny (untrained) model of each objective beside its run's flags.json."""
    root = tmp_path_factory.mktemp("saved_objectives")
    paths = {}
    for objective in flag_table.OBJECTIVES:
        run = root / objective
        run.mkdir()
        run_flags = dict(flag_table.script_defaults("image_train"), **TINY_NETWORK, objective=objective)
        torch.save(model_from_flags(run_flags).state_dict(), run / "model000001.pt")
        (run / "flags.json").write_text(json.dumps(run_flags))
        paths[objective] = run / "model000001.pt"
    return paths


@pytest.mark.parametrize("objective, argv, status, needles", [
    ("edm", ["--timestep_respacing", "ddim10"], 2, ["'ddim10' of an EDM process", "karrasN"]),
    ("flow", ["--timestep_respacing", "10,10"], 2, ["'10,10' of a flow", "uniformN"]),
    ("edm", ["--continuous_timesteps", True], 2,
     ["--continuous_timesteps does not apply to this model's --objective edm"]),
    ("flow", ["--diffusion_steps", 50], 2, ["--diffusion_steps does not apply to this model's --objective flow"]),
    ("ddpm", ["--diffusion_steps", 50], 1, ["--diffusion_steps 50 (trained with 1000)"]),
    ("edm", ["--objective", "ddpm"], 1, ["--objective ddpm (trained with 'edm')"]),
    ("ddpm", ["--sigma_max", 10], 2, ["--sigma_max does not apply to this model's --objective ddpm"]),
    ("ddpm", ["--timestep_respacing", "ddim10", "--continuous_timesteps", True], 2,
     ["ddim10 has no continuous form"]),
    ("ddpm", ["--timestep_respacing", "5,5", "--continuous_timesteps", True], 2, ["no continuous form"]),
    ("ddpm", ["--continuous_timesteps", True], 2, ["--continuous_timesteps", "--timestep_respacing"]),
])
def test_sampling_flags_that_do_not_fit_the_model_s_objective_fail_before_any_work(
    saved_models, objective, argv, status, needles, tmp_path, monkeypatch, capsys
):
    full = ["--model_path", saved_models[objective], "--num_samples", 1, *argv]
    code, _, err = run_main("image_sample", full, tmp_path / "out", monkeypatch, capsys)
    assert_error_line(code, err, status, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("objective, values, needles", [
    ("edm", [1, 500, 999], ["EDM noise levels sigma", "[0.002, 80.0]"]),
    ("flow", [1, 500, 999], ["flow times t in (0, 1]"]),
    ("ddpm", [0.25, 0.5], ["timesteps"]),
])
def test_a_json_spacing_of_another_process_s_kind_is_refused(saved_models, objective, values, needles, tmp_path,
                                                             monkeypatch, capsys):
    spacing = tmp_path / "nodes.json"
    spacing.write_text(json.dumps(values))
    full = ["--model_path", saved_models[objective], "--num_samples", 1, "--timestep_respacing", spacing]
    code, _, err = run_main("image_sample", full, tmp_path / "out", monkeypatch, capsys)
    assert code in (1, 2)
    assert_error_line(code, err, code, str(spacing), *needles)


@pytest.mark.parametrize("script, extra", [
    ("image_nll", ["--data_dir", "unused"]),
    ("classifier_sample", ["--num_classes", 2]),
])
def test_ddpm_only_scripts_refuse_other_objectives(saved_models, script, extra, tmp_path, monkeypatch, capsys):
    full = ["--model_path", saved_models["flow"], *extra]
    code, _, err = run_main(script, full, tmp_path / "out", monkeypatch, capsys)
    assert_error_line(code, err, 1, "--objective flow", "DDPM-family")


def test_image_restore_inpaints_with_the_objective_s_process(runs, tmp_path):
    objective, root = runs
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "inputs.npz", images)
    argv = {"model_path": root / "whole" / "ema_0.9_000008.pt", "input": tmp_path / "inputs.npz",
            "task": "inpaint", "mask": "box", "method": "ddnm", "batch_size": 2, "seed": 1,
            "timestep_respacing": {"edm": "karras4", "flow": "uniform4"}[objective]}
    status, out, err = run_script("image_restore.py", argv, tmp_path / "restored")
    assert status == 0, err
    restored = np.load(tmp_path / "restored" / "restored_2x8x8x3.npz")["arr_0"]
    assert restored.shape == (2, 8, 8, 3)
    # DDNM with sigma_y = 0 is consistent with the measurement to float precision.
    mean_error = float(out.split("mean ||A(x) - y|| = ")[1].split()[0])
    assert mean_error < 1e-4, out
