"""benchmarks/bench_posthoc_ema_digits.py runs at its smallest size (nothing is scored; see test_benchmarks.py)."""

from test_benchmarks import run_benchmark


def test_the_sigma_rel_sweep_on_the_digits_prints_its_table(tmp_path):
    result = run_benchmark("bench_posthoc_ema_digits.py", [
        "--out_dir", str(tmp_path), "--steps", "4", "--snapshot_interval", "1", "--sweep", "0.01,0.07,0.28",
        "--num_samples", "2"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row[0] for row in rows[2:]] == ["| raw weights (model000004.pt)", "| the demo's `--ema_rate 0.995`",
                                            "| post-hoc `--ema_std 0.070`"], "0.01 and 0.28 are out of range"
    assert sorted(p.name for p in (tmp_path / "run").glob("ema_std*")) == ["ema_std0.070_000004.pt"]
