"""
End to end: tiny models trained for a few steps by image_train.py and
super_res_train.py feed image_sample.py (DDPM and DDIM, with and without
class conditioning), image_nll.py and super_res_sample.py, each run as a user
would run it: in this process as `python script.py` would run it, and as
real processes where the process is the subject (2 ranks under mpiexec or
torchrun; --compile, whose TORCH_LOGS torch reads as it loads).

Every run uses one CPU thread per process, so that a sample's arithmetic, and
hence its bits, are the same in every run that is compared.
"""

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from _in_process import run_in_process
from _launch import run_command
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent

TINY_MODEL = [
    "--image_size", "8",
    "--num_channels", "32",
    "--num_res_blocks", "1",
    "--num_heads", "2",
    "--attention_resolutions", "4",
    "--learn_sigma", "True",
    "--diffusion_steps", "20",
    "--noise_schedule", "cosine",
]
TINY_SR_MODEL = [
    "--large_size", "16",
    "--small_size", "8",
    "--num_channels", "32",
    "--num_res_blocks", "1",
    "--attention_resolutions", "",
    "--diffusion_steps", "20",
]
DDIM = ["--use_ddim", "True", "--timestep_respacing", "ddim5"]


def run_script(script, args, log_dir, launcher=None, expect_ok=True, env=None):
    """
    Run scripts/`script` with `args` logging to `log_dir` (`env`: more
    variables): in this process, or in the real processes that `launcher`
    (a command prefix) starts; return the CompletedProcess.
    """
    env = dict(os.environ, OPENAI_LOGDIR=str(log_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    path, args = ROOT / "scripts" / script, [str(a) for a in args]
    if launcher is None:
        result = run_in_process(path, args, env=env)
    else:
        result = run_command([*launcher, str(path), *args], env=env, timeout=300)
    if expect_ok and result.returncode != 0:
        command = " ".join(map(str, result.args))
        pytest.fail(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def mpiexec(n):
    return (str(BIN / "mpiexec"), "-n", str(n), sys.executable)


def torchrun(n):
    return (str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}")


def load_only(log_dir, pattern):
    """The arrays of the single file matching `pattern` in `log_dir`, as a dict."""
    paths = sorted(pathlib.Path(log_dir).glob(pattern))
    assert len(paths) == 1, f"expected one {pattern} in {log_dir}, found {paths}"
    with np.load(paths[0]) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def data_dir(workspace):
    """Eight 16x16 RGB images of two classes ("a", "b")."""
    folder = workspace / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        ramp = np.linspace(0, 255, 16, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1, size=3)
        image = np.clip(ramp + rng.normal(0, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{'ab'[k % 2]}_{k}.png")
    return folder


def train(workspace, name, script, data_dir, flags):
    """Train for 2 steps; return the path of the final model checkpoint."""
    log_dir = workspace / name
    args = ["--data_dir", data_dir, "--batch_size", 4, "--max_steps", 2, "--seed", 0, "--lr", 1e-3, *flags]
    run_script(script, args, log_dir)
    models = sorted(log_dir.glob("model*.pt"))
    assert models, f"{script} wrote no model checkpoint in {log_dir}: {sorted(os.listdir(log_dir))}"
    assert (log_dir / "flags.json").exists()
    return models[-1]


@pytest.fixture(scope="module")
def uncond_model(workspace, data_dir):
    return train(workspace, "train_uncond", "image_train.py", data_dir, TINY_MODEL)


@pytest.fixture(scope="module")
def cond_model(workspace, data_dir):
    flags = [*TINY_MODEL, "--class_cond", "True", "--num_classes", 4]
    return train(workspace, "train_cond", "image_train.py", data_dir, flags)


@pytest.fixture(scope="module")
def sr_model(workspace, data_dir):
    return train(workspace, "train_sr", "super_res_train.py", data_dir, TINY_SR_MODEL)


def ddim_b2_args(model):
    """image_sample.py's flags for 5 DDIM samples in batches of 2 from --model_path alone."""
    return ["--model_path", model, *DDIM, "--num_samples", 5, "--batch_size", 2, "--seed", 1]


@pytest.fixture(scope="module")
def ddim_run(workspace, uncond_model):
    log_dir = workspace / "ddim_b2"
    args = ddim_b2_args(uncond_model)
    result = run_script("image_sample.py", args, log_dir)
    return log_dir, result, args


def test_ddim_sample_writes_exactly_num_samples(ddim_run):
    log_dir, result, _ = ddim_run
    arrays = load_only(log_dir, "samples_*.npz")
    assert list(arrays) == ["arr_0"], "an unconditional model writes no labels"
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (5, 8, 8, 3)
    assert len({arrays["arr_0"][k].tobytes() for k in range(5)}) == 5
    npz, grid = log_dir / "samples_5x8x8x3.npz", log_dir / "samples_5x8x8x3_grid.png"
    assert grid.exists() and str(npz) in result.stdout and str(grid) in result.stdout
    assert not list(log_dir.glob("*.tmp")) and not list(log_dir.glob("*_pngs"))


def test_ddim_seed_gives_the_same_samples_for_any_batch_size_and_rank_count(workspace, ddim_run):
    log_dir, _, args = ddim_run
    expected = load_only(log_dir, "samples_*.npz")["arr_0"]
    run_script("image_sample.py", args, workspace / "ddim_b2_again")
    rebatched = [*args[:-4], "--batch_size", 3, "--seed", 1]
    run_script("image_sample.py", rebatched, workspace / "ddim_b3")
    run_script("image_sample.py", args, workspace / "ddim_mpi2", launcher=mpiexec(2))
    for name in ("ddim_b2_again", "ddim_b3", "ddim_mpi2"):
        np.testing.assert_array_equal(load_only(workspace / name, "samples_*.npz")["arr_0"], expected, err_msg=name)
    other_seed = [*args[:-2], "--seed", 2]
    run_script("image_sample.py", other_seed, workspace / "ddim_seed2")
    assert not np.array_equal(load_only(workspace / "ddim_seed2", "samples_*.npz")["arr_0"], expected)


def test_compiled_model_gives_the_eager_samples(workspace, data_dir):
    """
    --compile (torch.compile) changes the speed, not the samples, and compiles
    once: the short last batch (5 samples in batches of 2) runs padded. The
    model has one level and attention only in its middle block: each fused
    kernel torch.compile builds costs a C++ compilation, made in the sampling
    process itself (one compile thread: no pool of fresh interpreters).
    """
    one_level = [*TINY_MODEL, "--channel_mult", "1", "--attention_resolutions", ""]
    model = train(workspace, "train_one_level", "image_train.py", data_dir, one_level)
    log_dir = workspace / "ddim_one_level"
    args = ddim_b2_args(model)
    run_script("image_sample.py", args, log_dir)
    expected = load_only(log_dir, "samples_*.npz")["arr_0"].astype(np.int16)
    compile_env = {"TORCH_LOGS": "recompiles", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    result = run_script("image_sample.py", [*args, "--compile", "True"], workspace / "ddim_compiled",
                        launcher=(sys.executable,), env=compile_env)
    assert "Recompiling" not in result.stderr, result.stderr
    compiled = load_only(workspace / "ddim_compiled", "samples_*.npz")["arr_0"].astype(np.int16)
    # Fused kernels round differently in the last bits: a pixel may land one level off.
    assert compiled.shape == expected.shape
    assert np.abs(compiled - expected).max() <= 1
    assert np.mean(compiled == expected) > 0.98


def test_ddpm_step_noise_is_per_sample_across_batches_and_ranks(workspace, uncond_model):
    common = ["--model_path", uncond_model, "--timestep_respacing", "10", "--num_samples", 3, "--seed", 5]
    run_script("image_sample.py", [*common, "--batch_size", 3], workspace / "ddpm_b3")
    run_script("image_sample.py", [*common, "--batch_size", 1], workspace / "ddpm_torchrun2", launcher=torchrun(2))
    expected = load_only(workspace / "ddpm_b3", "samples_*.npz")["arr_0"]
    assert expected.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(load_only(workspace / "ddpm_torchrun2", "samples_*.npz")["arr_0"], expected)


def test_class_conditional_sampling_with_random_and_fixed_labels(workspace, cond_model):
    common = ["--model_path", cond_model, *DDIM, "--num_samples", 6, "--batch_size", 4, "--seed", 3]
    run_script("image_sample.py", common, workspace / "cond_random")
    run_script("image_sample.py", [*common, "--class_label", 3, "--save_pngs", True], workspace / "cond_3")
    random = load_only(workspace / "cond_random", "samples_6x8x8x3.npz")
    fixed = load_only(workspace / "cond_3", "samples_6x8x8x3.npz")
    assert random["arr_1"].shape == (6,) and set(random["arr_1"]) <= {0, 1, 2, 3}
    assert len(set(random["arr_1"])) > 1
    assert fixed["arr_1"].tolist() == [3] * 6
    pngs = sorted((workspace / "cond_3" / "samples_6x8x8x3_pngs").iterdir())
    assert len(pngs) == 6
    np.testing.assert_array_equal(np.array(Image.open(pngs[4])), fixed["arr_0"][4])


def test_nll_writes_per_timestep_terms(workspace, uncond_model, data_dir):
    args = ["--model_path", uncond_model, "--data_dir", data_dir, "--timestep_respacing", "5"]
    result = run_script("image_nll.py", [*args, "--num_samples", 3, "--batch_size", 2, "--seed", 0], workspace / "nll")
    terms = load_only(workspace / "nll", "terms_*.npz")
    assert set(terms) == {"vb", "mse", "xstart_mse", "prior_bpd", "total_bpd"}
    assert terms["vb"].shape == terms["mse"].shape == terms["xstart_mse"].shape == (3, 5)
    assert terms["prior_bpd"].shape == terms["total_bpd"].shape == (3,)
    np.testing.assert_allclose(terms["total_bpd"], terms["vb"].sum(1) + terms["prior_bpd"], rtol=1e-5)
    assert np.all(np.isfinite(terms["total_bpd"])) and np.all(terms["total_bpd"] > 0)
    assert "3 of 3 images" in result.stdout and "bits/dim" in result.stdout


def test_super_res_upsamples_base_samples_with_ddim_and_keeps_labels(workspace, sr_model, cond_model):
    base_dir = workspace / "sr_base"
    base_args = ["--model_path", cond_model, *DDIM, "--num_samples", 3, "--batch_size", 3, "--seed", 0]
    run_script("image_sample.py", base_args, base_dir)
    base = load_only(base_dir, "samples_*.npz")
    sr_args = ["--model_path", sr_model, "--base_samples", base_dir / "samples_3x8x8x3.npz", *DDIM]
    run_script("super_res_sample.py", [*sr_args, "--num_samples", 3, "--batch_size", 2, "--seed", 4], workspace / "sr")
    upsampled = load_only(workspace / "sr", "samples_*.npz")
    assert upsampled["arr_0"].dtype == np.uint8 and upsampled["arr_0"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(upsampled["arr_1"], base["arr_1"])
    run_script("super_res_sample.py", [*sr_args, "--num_samples", 3, "--batch_size", 3, "--seed", 4], workspace / "sr3")
    np.testing.assert_array_equal(load_only(workspace / "sr3", "samples_*.npz")["arr_0"], upsampled["arr_0"])


def assert_clean_failure(result, *needles, status=1):
    """
    A clean exit: `status` (1: an input that does not fit; 2: flags that
    cannot work) and an error message naming `needles`, no traceback.
    """
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_flags_that_contradict_the_training_run_fail_before_any_work(workspace, uncond_model):
    args = ["--model_path", uncond_model, "--image_size", 16, "--learn_sigma", "False", "--num_samples", 1]
    result = run_script("image_sample.py", args, workspace / "bad_flags", expect_ok=False)
    assert_clean_failure(result, "--image_size 16", "--learn_sigma False", "flags.json")
    assert not list((workspace / "bad_flags").glob("samples_*"))


def test_an_optimizer_file_as_model_path_is_named(workspace, uncond_model):
    opt_path = next(uncond_model.parent.glob("opt*.pt"))
    args = ["--model_path", opt_path, "--num_samples", 1]
    result = run_script("image_sample.py", args, workspace / "opt_model", expect_ok=False)
    assert_clean_failure(result, opt_path.name)
    assert "optimizer" in result.stderr.lower()


def test_without_saved_flags_the_given_flags_must_match_the_weights(workspace, uncond_model):
    lone = workspace / "lone"
    lone.mkdir()
    shutil.copy(uncond_model, lone / "model.pt")
    args = ["--model_path", lone / "model.pt", *DDIM, "--num_samples", 2, "--batch_size", 2]
    wrong = [*TINY_MODEL[:2], "--num_channels", "64", *TINY_MODEL[4:]]
    result = run_script("image_sample.py", [*args, *wrong], workspace / "lone_wrong", expect_ok=False)
    assert_clean_failure(result, "num_channels")
    run_script("image_sample.py", [*args, *TINY_MODEL], workspace / "lone_right")
    assert load_only(workspace / "lone_right", "samples_*.npz")["arr_0"].shape == (2, 8, 8, 3)


# ---------------------------------------------------------------- samplers (SPEC 11)

SAMPLER_NAMES = ["ddpm", "ddim", "plms", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_writes_a_valid_npz_and_logs_its_cost(workspace, uncond_model, sampler):
    from improved_diffusion.samplers import model_evaluations

    log_dir = workspace / f"sampler_{sampler}"
    args = ["--model_path", uncond_model, "--sampler", sampler, "--timestep_respacing", "trailing4",
            "--num_samples", 3, "--batch_size", 2, "--seed", 0]
    result = run_script("image_sample.py", args, log_dir)
    images = load_only(log_dir, "samples_*.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 3)
    assert len({images[k].tobytes() for k in range(3)}) == 3
    evaluations = model_evaluations(sampler, 4)
    assert f"sampler {sampler} over 4 timesteps (19, 14, 9, 4): {evaluations} model evaluations" in result.stdout


def test_sample_name_names_the_npz_and_the_grid(workspace, uncond_model):
    log_dir = workspace / "named"
    args = ["--model_path", uncond_model, *DDIM, "--num_samples", 2, "--batch_size", 2, "--sample_name=ddim5_run"]
    run_script("image_sample.py", args, log_dir)
    assert (log_dir / "ddim5_run_2x8x8x3.npz").exists() and (log_dir / "ddim5_run_2x8x8x3_grid.png").exists()
    assert not list(log_dir.glob("samples_*"))


def test_timestep_search_writes_json_that_sampling_accepts(workspace, uncond_model):
    out_dir = workspace / "search"
    steps_file = out_dir / "steps.json"
    args = ["--model_path", uncond_model, "--sampler", "dpmpp_2m", "--steps", 4, "--num_samples", 4,
            "--output", steps_file, "--seed", 0]
    result = run_script("search_timesteps.py", args, out_dir)
    timesteps = json.loads(steps_file.read_text())
    assert len(timesteps) == 4 and timesteps == sorted(set(timesteps)) and timesteps[-1] == 19
    errors = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
              if line.split() and line.split()[0] in ("search", "trailing", "logsnr", "karras", "refined")}
    assert set(errors) == {"search", "trailing", "logsnr", "karras", "refined"}, result.stdout
    assert errors["refined"] <= min(errors["trailing"], errors["logsnr"], errors["karras"])
    sample_args = ["--model_path", uncond_model, "--sampler", "dpmpp_2m", "--timestep_respacing", steps_file,
                   "--num_samples", 2, "--batch_size", 2]
    sampled = run_script("image_sample.py", sample_args, workspace / "searched_sampling")
    assert f"over 4 timesteps ({', '.join(map(str, timesteps[::-1]))})" in sampled.stdout
    assert load_only(workspace / "searched_sampling", "samples_*.npz")["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--sampler", "dpm_fast"], ["unknown --sampler 'dpm_fast'", "dpmpp_2m", "unipc"]),
        (["--use_ddim", "True", "--sampler", "heun"], ["--use_ddim True", "--sampler heun"]),
        (["--sampler", "heun", "--eta", "0.5"], ["--eta", "heun ignores it"]),
        (["--sampler", "unipc", "--timestep_respacing", "trailing30"], ["trailing30", "T = 20"]),
        (["--sample_name", "../up"], ["--sample_name"]),
    ],
)
def test_sampler_flags_that_cannot_work_fail_cleanly(workspace, uncond_model, extra, needles):
    log_dir = workspace / "bad_sampler_flags"
    result = run_script("image_sample.py", ["--model_path", uncond_model, "--num_samples", 1, *extra], log_dir,
                        expect_ok=False)
    assert_clean_failure(result, *needles, status=2)
    assert not list(log_dir.glob("samples_*"))


def test_a_bad_timestep_file_fails_cleanly(workspace, uncond_model):
    bad = workspace / "bad_steps.json"
    bad.write_text("[5, 3, 1]")
    args = ["--model_path", uncond_model, "--timestep_respacing", bad, "--num_samples", 1]
    result = run_script("image_sample.py", args, workspace / "bad_steps", expect_ok=False)
    assert_clean_failure(result, "bad_steps.json", "strictly increasing")


def test_super_res_sampling_takes_a_sampler(workspace, sr_model, uncond_model):
    base_dir = workspace / "sr_sampler_base"
    run_script("image_sample.py", ["--model_path", uncond_model, *DDIM, "--num_samples", 2, "--batch_size", 2],
               base_dir)
    args = ["--model_path", sr_model, "--base_samples", base_dir / "samples_2x8x8x3.npz", "--sampler", "unipc",
            "--timestep_respacing", "ddim5", "--num_samples", 2, "--batch_size", 2, "--sample_name", "up"]
    result = run_script("super_res_sample.py", args, workspace / "sr_sampler")
    assert "sampler unipc over 5 timesteps" in result.stdout
    assert load_only(workspace / "sr_sampler", "up_*.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_v_prediction_with_zero_terminal_snr_trains_and_samples(workspace, data_dir):
    flags = [*TINY_MODEL, "--predict_v", "True", "--rescale_zero_terminal_snr", "True", "--snr_gamma", 5]
    model = train(workspace, "train_v", "image_train.py", data_dir, flags)
    saved = json.loads((model.parent / "flags.json").read_text())
    assert (saved["predict_v"], saved["rescale_zero_terminal_snr"], saved["snr_gamma"]) == (True, True, 5.0)
    args = ["--model_path", model, "--sampler", "dpmpp_2m", "--timestep_respacing", "trailing4",
            "--num_samples", 2, "--batch_size", 2]
    result = run_script("image_sample.py", args, workspace / "v_samples")
    assert "over 4 timesteps (19, 14, 9, 4)" in result.stdout
    images = load_only(workspace / "v_samples", "samples_*.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3) and len({images[0].tobytes(), images[1].tobytes()}) == 2
    as_eps = run_script("image_sample.py", [*args, "--predict_v", "False"], workspace / "v_as_eps", expect_ok=False)
    assert_clean_failure(as_eps, "--predict_v False", "flags.json")


def test_classifier_free_guidance_trains_a_null_label_and_samples_at_several_scales(workspace, data_dir, cond_model):
    flags = [*TINY_MODEL, "--class_cond", "True", "--num_classes", 4, "--class_dropout_prob", 0.5]
    model = train(workspace, "train_cfg", "image_train.py", data_dir, flags)
    assert json.loads((model.parent / "flags.json").read_text())["class_dropout_prob"] == 0.5
    common = ["--model_path", model, "--sampler", "dpmpp_2m", "--timestep_respacing", "trailing4",
              "--num_samples", 3, "--batch_size", 3, "--class_label", 1, "--seed", 0]
    outputs = {}
    for scale in (0, 1, 2):
        result = run_script("image_sample.py", [*common, "--guidance_scale", scale], workspace / f"cfg_{scale}")
        outputs[scale] = load_only(workspace / f"cfg_{scale}", "samples_*.npz")["arr_0"]
        assert outputs[scale].shape == (3, 8, 8, 3)
        assert (f"guidance at scale {float(scale)}" in result.stdout) == (scale != 1)
    run_script("image_sample.py", common, workspace / "cfg_none")
    np.testing.assert_array_equal(outputs[1], load_only(workspace / "cfg_none", "samples_*.npz")["arr_0"])
    assert not np.array_equal(outputs[0], outputs[2])
    interval = run_script("image_sample.py", [*common, "--guidance_scale", 2, "--guidance_interval", "5,15"],
                          workspace / "cfg_interval")
    assert "at base timesteps (5, 15)" in interval.stdout
    no_null = run_script("image_sample.py", ["--model_path", cond_model, "--guidance_scale", 2, "--num_samples", 1],
                         workspace / "cfg_no_null", expect_ok=False)
    assert_clean_failure(no_null, "--class_dropout_prob 0.1")


def test_guidance_on_an_unconditional_model_fails_cleanly(workspace, uncond_model):
    result = run_script("image_sample.py", ["--model_path", uncond_model, "--guidance_scale", 3, "--num_samples", 1],
                        workspace / "cfg_uncond", expect_ok=False)
    assert_clean_failure(result, "--guidance_scale", "class-conditional")
