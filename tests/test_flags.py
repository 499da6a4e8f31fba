"""
The one table of flags (improved_diffusion/flags.py): every flag of every
script declared with a help text and a kind; the reference's defaults dicts
and every script's flags exactly as they were before the table (the values
are written here, not recomputed from it); `--help` grouped with each flag's
help and default; and a flag of a checkpoint kind that differs from the
checkpoint's run failing before any work, naming the flag.
"""

import importlib.util
import json
import pathlib

import pytest
import torch

from improved_diffusion import flags, logger, script_util
from improved_diffusion.run_flags import write_run_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The objectives of SPEC 18 and their flags, after the model and diffusion defaults.
OBJECTIVES = {
    "objective": "ddpm", "continuous_timesteps": False, "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
    "P_mean": -1.2, "P_std": 1.2, "logit_mean": 0.0, "logit_std": 1.0, "time_sampling": "logit_normal",
}

MODEL_AND_DIFFUSION = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "sigma_small": False,
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "predict_v": False, "snr_gamma": 0.0,
    "rescale_zero_terminal_snr": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True, "channel_mult": "", "num_classes": 1000,
    "num_head_channels": -1, "resblock_updown": False, "use_new_attention_order": False, "use_fp16": False,
    "class_dropout_prob": 0.0, "image_channels": 3,
}
SR_MODEL_AND_DIFFUSION = {
    "large_size": 256, "small_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False,
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "predict_v": False, "snr_gamma": 0.0,
    "rescale_zero_terminal_snr": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True, "channel_mult": "", "num_classes": 1000,
    "num_head_channels": -1, "resblock_updown": False, "use_new_attention_order": False, "use_fp16": False,
    "class_dropout_prob": 0.0, "image_channels": 3,
}
DIFFUSION = {
    "learn_sigma": False, "sigma_small": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    "timestep_respacing": "", "use_kl": False, "predict_xstart": False, "predict_v": False, "snr_gamma": 0.0,
    "rescale_zero_terminal_snr": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
}
CLASSIFIER = {
    "image_size": 64, "classifier_use_fp16": False, "classifier_width": 128, "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8", "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True, "classifier_pool": "attention",
}
# The training core's options (SPEC 17, 20), in every training script.
TRAINING_CORE = {
    "ema_std": "", "ema_snapshot_interval": 0, "grad_clip": 0.0, "lr_warmup_steps": 0, "save_format": "pt",
    "init_checkpoint": "",
}
TRAINING = {
    "data_dir": "", "schedule_sampler": "uniform", "lr": 0.0001, "weight_decay": 0.0, "lr_anneal_steps": 0,
    "batch_size": 1, "microbatch": -1, "ema_rate": "0.9999", "log_interval": 10, "save_interval": 10000,
    "resume_checkpoint": "", "use_fp16": False, "fp16_scale_growth": 0.001, "seed": 0, "max_steps": 0,
    "use_bf16": False, "random_flip": False, "random_crop": False, "keep_checkpoints": 0, "max_bad_steps": 20,
    "allow_partial_resume": False, "check_replicas": False, "num_workers": 1, "allow_mixed_channels": False,
    "eval_interval": 0, "eval_num_samples": 1000, "eval_sampler": "ddim", "eval_timestep_respacing": "ddim25",
    "inception_weights": "", **TRAINING_CORE,
}
COMMON_SAMPLING = {"seed": -1, "use_bf16": False, "use_fp16": False, "compile": False}
SAMPLER = {"sampler": "", "sample_name": "", "guidance_scale": 1.0, "guidance_interval": ""}
IMAGE_SAMPLING = {
    "clip_denoised": True, "num_samples": 10000, "batch_size": 16, "use_ddim": False, "model_path": "", "eta": 0.0,
    "class_label": -1, "save_pngs": False, **SAMPLER, **COMMON_SAMPLING,
}
NEW_MODEL_FLAGS = {"null_label": False, **OBJECTIVES}

# Every script's flags and defaults, in --help order.
SCRIPT_DEFAULTS = {
    "image_train": {**TRAINING, **MODEL_AND_DIFFUSION, **NEW_MODEL_FLAGS},
    "super_res_train": {**TRAINING, **SR_MODEL_AND_DIFFUSION, **NEW_MODEL_FLAGS},
    "classifier_train": {
        "data_dir": "", "val_data_dir": "", "noised": True, "iterations": 150000, "lr": 0.0003, "weight_decay": 0.0,
        "anneal_lr": False, "batch_size": 4, "microbatch": -1, "schedule_sampler": "uniform",
        "resume_checkpoint": "", "log_interval": 10, "eval_interval": 5, "save_interval": 10000, "seed": 0,
        "num_classes": 1000, "image_channels": 3, "allow_partial_resume": False, "keep_checkpoints": 0,
        **TRAINING_CORE, **CLASSIFIER, **DIFFUSION,
    },
    "image_sample": {**IMAGE_SAMPLING, **MODEL_AND_DIFFUSION, **NEW_MODEL_FLAGS},
    "super_res_sample": {
        "clip_denoised": True, "base_samples": "", "num_samples": 10000, "batch_size": 16, "use_ddim": False,
        "model_path": "", "eta": 0.0, "save_pngs": False, **SAMPLER, **COMMON_SAMPLING, **SR_MODEL_AND_DIFFUSION,
        **NEW_MODEL_FLAGS,
    },
    "image_nll": {
        "data_dir": "", "clip_denoised": True, "num_samples": 1000, "batch_size": 1, "model_path": "",
        **COMMON_SAMPLING, **MODEL_AND_DIFFUSION, **NEW_MODEL_FLAGS,
    },
    "classifier_sample": {
        **IMAGE_SAMPLING, "classifier_path": "", "classifier_scale": 1.0,
        **{k: v for k, v in CLASSIFIER.items() if k != "image_size"}, **MODEL_AND_DIFFUSION, "num_classes": -1,
        **NEW_MODEL_FLAGS,
    },
    "search_timesteps": {
        "model_path": "", "sampler": "dpmpp_2m", "steps": 10, "output": "steps.json", "grid_size": 100,
        "refine_rounds": 2, "clip_denoised": True, "num_samples": 8, "batch_size": 8, "class_label": -1,
        **COMMON_SAMPLING, **MODEL_AND_DIFFUSION, **NEW_MODEL_FLAGS,
    },
    "image_restore": {
        "model_path": "", "input": "", "task": "", "mask": "", "method": "ddnm", "sampler": "ddim", "eta": 0.0,
        "t_start": 0.5, "dps_scale": 1.0, "jump_length": 10, "jump_n_sample": 10, "sigma_y": 0.0,
        "super_res_factor": 2, "blur_sigma": 1.0, "blur_size": 5, "num_samples_per_input": 1, "clip_denoised": True,
        "batch_size": 16, "class_label": -1, "sample_name": "", **COMMON_SAMPLING, **MODEL_AND_DIFFUSION,
        **NEW_MODEL_FLAGS,
    },
    "image_eval": {"inception_weights": "", "batch_size": 64, "output": "", "ref_stats": ""},
    "plot_progress": {"output": "", "keys": "loss,mse,vb"},
    "reconstruct_ema": {"log_dir": "", "ema_std": "", "step": None},
    "convert_checkpoint": {},
}


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_defaults_dicts_are_unchanged():
    assert list(script_util.model_and_diffusion_defaults().items()) == list(MODEL_AND_DIFFUSION.items())
    assert list(script_util.sr_model_and_diffusion_defaults().items()) == list(SR_MODEL_AND_DIFFUSION.items())
    assert list(script_util.diffusion_defaults().items()) == list(DIFFUSION.items())
    assert list(script_util.classifier_defaults().items()) == list(CLASSIFIER.items())
    assert list(script_util.classifier_and_diffusion_defaults().items()) == list({**CLASSIFIER, **DIFFUSION}.items())


@pytest.mark.parametrize("script", sorted(SCRIPT_DEFAULTS))
def test_every_script_has_its_flags_and_defaults(script):
    assert list(flags.script_defaults(script).items()) == list(SCRIPT_DEFAULTS[script].items())


def test_every_script_is_in_the_table_with_main_taking_argv():
    scripts = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))
    assert set(flags.SCRIPTS) == set(SCRIPT_DEFAULTS) and set(flags.SCRIPTS) <= set(scripts)
    for name in scripts:
        text = (ROOT / "scripts" / f"{name}.py").read_text()
        assert "def main(argv=None):" in text and text.rstrip().endswith('if __name__ == "__main__":\n    main()'), name
        assert name in flags.SCRIPTS or "argparse" in text, f"{name} parses flags outside the table"


def test_every_flag_has_a_help_text_a_kind_and_a_heading():
    for script in flags.SCRIPTS:
        for flag in flags.script_flags(script):
            assert flag.help.strip() and flag.kind in flags.KINDS and flag.group in flags.GROUPS, (script, flag)
            assert flag.positional or flag.default is None or flag.parse_type()(str(flag.default)) == flag.default, (
                script, flag.name)


def test_kinds_say_what_a_checkpoint_fixes():
    kinds = {name: flags.FLAGS[name].kind for name in flags.FLAGS}
    assert {n for n in MODEL_AND_DIFFUSION if kinds[n] == flags.ARCHITECTURE} == {
        "image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample", "attention_resolutions",
        "learn_sigma", "class_cond", "use_scale_shift_norm", "channel_mult", "num_classes", "num_head_channels",
        "resblock_updown", "use_new_attention_order", "image_channels",
    }
    assert {n for n in MODEL_AND_DIFFUSION if kinds[n] == flags.PROCESS} == {
        "sigma_small", "diffusion_steps", "noise_schedule", "predict_xstart", "predict_v",
        "rescale_zero_terminal_snr", "rescale_timesteps",
    }
    assert {n for n in flags.MODEL_EXTRAS if kinds[n] == flags.PROCESS} == {
        "objective", "sigma_data", "sigma_min", "sigma_max",
    }
    assert kinds["null_label"] == flags.ARCHITECTURE and kinds["class_dropout_prob"] == flags.TRAINING
    assert kinds["timestep_respacing"] == kinds["model_path"] == flags.SAMPLING


def test_help_lists_each_flag_with_its_text_and_default_under_its_heading(capsys):
    with pytest.raises(SystemExit) as info:
        load_script("image_train").main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    headings = [out.index(f"{group} flags:") for group in ("INPUT", "MODEL", "DIFFUSION", "TRAIN", "EVAL")]
    assert headings == sorted(headings)
    text = "".join(out.split())  # argparse wraps lines, at hyphens too
    for flag in flags.script_flags("image_train"):
        assert f"--{flag.name}{flag.name.upper()}" in text, flag.name
        shown = '""' if flag.default == "" else str(flag.default)
        shown += "".join(f";{name}:{value}" for name, value in (flag.per_objective or {}).items())
        assert "".join(flag.help.split()) in text and f"default:{shown}]" in text, flag.name
    assert "[architecture,default:128]" in text and "[ddpmonly,process,default:linear]" in text
    assert "[edmonly,process,default:0.5]" in text and "[flowonly,default:logit_normal]" in text
    assert "[default:ddim;edm:heun;flow:euler]" in text


def test_contradictions_name_the_checkpoint_kinds_only():
    saved = dict(MODEL_AND_DIFFUSION, num_channels=32, diffusion_steps=100, dropout=0.3)
    given = dict(MODEL_AND_DIFFUSION, num_channels=64, diffusion_steps=50, dropout=0.0)
    assert flags.contradictions(given, saved, list(MODEL_AND_DIFFUSION)) == [
        "--num_channels 64 (trained with 32)", "--diffusion_steps 50 (trained with 100)",
    ]
    assert flags.contradictions(given, saved, list(MODEL_AND_DIFFUSION), explicit={"dropout"}) == []


# ---------------------------------------------------------------- a flag against a checkpoint's run

TINY = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "", "diffusion_steps": 20}


@pytest.fixture
def saved_run(tmp_path):
    """A checkpoint of a tiny model (never trained) with the flags.json of an image_train.py run beside it."""
    run = tmp_path / "run"
    run.mkdir()
    run_flags = dict(flags.script_defaults("image_train"), **TINY)
    model, _ = script_util.create_model_and_diffusion(**{k: run_flags[k] for k in MODEL_AND_DIFFUSION})
    torch.save(model.state_dict(), run / "model000001.pt")
    write_run_flags(str(run), run_flags)
    return run


def run_main(name, argv, log_dir, monkeypatch, capsys):
    """Run scripts/`name` main(argv) in this process with OPENAI_LOGDIR=log_dir; (exit status, stdout, stderr)."""
    monkeypatch.setenv("OPENAI_LOGDIR", str(log_dir))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "log")
    try:
        load_script(name).main([str(a) for a in argv])
        status = 0
    except SystemExit as exc:
        status = exc.code
    finally:
        logger.reset()
    out, err = capsys.readouterr()
    return status, out, err


def assert_error_line(status, err, expected_status, *needles):
    assert status == expected_status, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, err


def test_sampling_with_an_architecture_flag_other_than_the_run_s_fails_before_any_work(
    saved_run, tmp_path, monkeypatch, capsys
):
    argv = ["--model_path", saved_run / "model000001.pt", "--num_channels", 64, "--num_samples", 1]
    status, _, err = run_main("image_sample", argv, tmp_path / "out", monkeypatch, capsys)
    assert_error_line(status, err, 1, "--num_channels 64 (trained with 32)", saved_run / "flags.json")
    assert not (tmp_path / "out").exists()


def test_resuming_with_an_architecture_or_process_flag_other_than_the_run_s_fails_naming_it(
    saved_run, tmp_path, monkeypatch, capsys
):
    before = (saved_run / "flags.json").read_text()
    argv = ["--data_dir", tmp_path, "--resume_checkpoint", saved_run / "model000001.pt",
            *[x for k, v in TINY.items() for x in (f"--{k}", v)], "--num_channels", 64, "--noise_schedule", "cosine"]
    status, _, err = run_main("image_train", argv, saved_run, monkeypatch, capsys)
    assert_error_line(status, err, 1, "--num_channels 64 (trained with 32)",
                      "--noise_schedule cosine (trained with 'linear')", "--resume_checkpoint")
    assert (saved_run / "flags.json").read_text() == before, "the run's flags.json is left as it was"
    assert sorted(p.name for p in saved_run.glob("*.pt")) == ["model000001.pt"]


def test_a_training_run_records_every_flag_and_the_null_label_class_dropout_implies(tmp_path, monkeypatch, capsys):
    argv = ["--data_dir", tmp_path / "missing", "--class_cond", "True", "--class_dropout_prob", 0.1]
    status, _, err = run_main("image_train", argv, tmp_path / "log", monkeypatch, capsys)
    assert_error_line(status, err, 1, tmp_path / "missing")
    recorded = json.loads((tmp_path / "log" / "flags.json").read_text())
    assert recorded == dict(SCRIPT_DEFAULTS["image_train"], data_dir=str(tmp_path / "missing"), class_cond=True,
                            class_dropout_prob=0.1, null_label=True)
    argv += ["--null_label", "False"]
    status, _, err = run_main("image_train", argv, tmp_path / "log2", monkeypatch, capsys)
    assert_error_line(status, err, 2, "--null_label False")
