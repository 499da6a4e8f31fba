"""
The benchmark scripts run as their README says (`python benchmarks/NAME.py
...`, here in this process), at the smallest sizes (this checks that they
work, not how fast anything is: timings are never asserted).
"""

import os
import pathlib

import pytest
from _in_process import run_in_process

ROOT = pathlib.Path(__file__).resolve().parent.parent

SMOKE_RUNS = {
    "bench_diffusion.py": ["--repeats", "1", "--batch_size", "2"],
    "bench_unet.py": ["--iters", "1", "--warmup", "0", "--batch", "1", "--skip_memory", "--threads", "1",
                     "--precisions", "float32"],
    "bench_train.py": ["--steps", "1", "--warmup", "0", "--threads", "1", "--modes", "fp32"],
    "bench_sample.py": ["--batch_size", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--precisions",
                        "float32"],
    "bench_samplers.py": ["--budgets", "5,8", "--num_points", "200", "--mixtures", "smooth", "--repeats", "1",
                          "--overhead_batch", "2", "--overhead_steps", "4", "--threads", "1"],
    "bench_data.py": ["--num_images", "12", "--source_size", "16", "--image_size", "8", "--batch_size", "4",
                      "--batches", "2", "--workers", "0"],
    "bench_demo_step.py": ["--steps", "1", "--warmup", "0", "--threads", "1", "--modes", "fp32"],
    "bench_classifier_guidance.py": ["--presets", "digits", "--repeats", "1", "--batch_size", "1", "--threads", "1"],
}


def run_benchmark(script, args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_in_process(ROOT / "benchmarks" / script, args, cwd=ROOT, env=env)


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_and_prints_a_table(script):
    result = run_benchmark(script, SMOKE_RUNS[script])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3, f"expected a markdown table (header, rule, rows):\n{result.stdout}"


def test_compare_reference_names_a_folder_without_the_reference(tmp_path):
    result = run_benchmark("compare_reference.py", ["--reference_dir", str(tmp_path)])
    assert result.returncode != 0
    assert f"--reference_dir {tmp_path}: no improved_diffusion/unet.py there" in result.stderr


def test_bench_eval_runs_at_tiny_sizes():
    args = ["--batch_size", "1", "--batches", "1", "--num_vectors", "50", "--width", "8", "--fid_samples", "5",
            "--device", "cpu"]
    result = run_benchmark("bench_eval.py", args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 6, result.stdout
    assert "precision_recall, 2 x 50 vectors of width 8" in result.stdout
