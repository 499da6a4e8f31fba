"""
The digits benchmarks run as their docstrings say, at their smallest sizes:
bench_objectives.py trains one step of the EDM, flow and classifier-free-guidance variants,
and bench_samplers_digits.py samples its checkpoint with samplers and with
guidance. This checks that they work; nothing is timed or scored. Each
runs in this process as `python benchmarks/NAME.py` would run it; the
scripts bench_objectives.py starts are fresh interpreters.
"""

import os
import pathlib

from _in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_benchmark(script, args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_in_process(ROOT / "benchmarks" / script, args, cwd=ROOT / "benchmarks", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3, f"expected a markdown table:\n{result.stdout}"
    return rows


def test_objectives_and_sampler_benchmarks_run_on_the_digits(tmp_path):
    rows = run_benchmark("bench_objectives.py", ["--out_dir", tmp_path, "--steps", "1", "--num_samples", "4",
                                                 "--variants", "edm,flow,cfg", "--evaluations", "5"])
    assert [row.split("|")[1].strip() for row in rows[-3:]] == [
        "EDM, --objective edm", "flow, --objective flow", "eps, --class_dropout_prob 0.1"]
    assert "sampler heun over 3 timesteps" in (tmp_path / "edm" / "samples_1" / "log.txt").read_text()
    model = tmp_path / "cfg" / "ema_0.995_000001.pt"
    rows = run_benchmark("bench_samplers_digits.py", [model, "--budgets", "3", "--num_samples", "4",
                                                      "--samplers", "dpmpp_2m", "--baseline", "ddim5"])
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["ddim (ddim5)", "dpmpp_2m (logsnr3)"]
    rows = run_benchmark("bench_samplers_digits.py", [model, "--guidance_scales", "1,2", "--num_samples", "4",
                                                      "--sampler_for_guidance", "dpmpp_2m:logsnr3",
                                                      "--grid_dir", tmp_path / "grids"])
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["1", "2"]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["guidance_1.png", "guidance_2.png"]
