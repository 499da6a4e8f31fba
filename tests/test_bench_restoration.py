"""
benchmarks/bench_restoration.py runs as its docstring says, at its smallest
sizes, on a tiny untrained model of the digits' shape (this checks that it
works; nothing is timed or scored).
"""

import os
import pathlib

import torch
from _in_process import run_in_process

from improved_diffusion import flags, script_util
from improved_diffusion.run_flags import write_run_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIGITS_MODEL = {"image_size": 8, "image_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                "attention_resolutions": "", "diffusion_steps": 1000, "noise_schedule": "cosine", "predict_v": True}


def test_restoration_benchmark_writes_its_split_tables_and_grid(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bench = ROOT / "benchmarks" / "bench_restoration.py"
    result = run_in_process(bench, ["--write_train_split", tmp_path / "train"], cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "train").glob("*.png"))) == 1797 - 360

    run_flags = dict(flags.script_defaults("image_train"), **DIGITS_MODEL)
    model, _ = script_util.create_model_and_diffusion(**{k: run_flags[k] for k in flags.MODEL_AND_DIFFUSION})
    torch.save(model.state_dict(), tmp_path / "ema_0.995_000001.pt")
    write_run_flags(str(tmp_path), run_flags)
    args = ["--model_path", tmp_path / "ema_0.995_000001.pt", "--num_images", 4, "--plans", "ddnm,repaint 5x5",
            "--steps", 6, "--timed", "dps 0.3", "--timed_steps", 3, "--repeats", 1, "--grid", tmp_path / "grid.png",
            "--grid_plans", "replace"]
    result = run_in_process(bench, args, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 4 + 2 + 1, result.stdout
    assert rows[2].startswith("| inpaint right half | ddnm | ddim | 6 | 6 |")
    assert rows[3].startswith("| inpaint right half | repaint 5x5 | ddpm | 6 | 26 |")
    assert rows[-1].startswith("| dps 0.3 | ddim | 3 |")
    assert (tmp_path / "grid.png").exists()
