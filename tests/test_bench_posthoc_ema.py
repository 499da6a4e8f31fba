"""benchmarks/bench_posthoc_ema.py runs at a small size (no timing is asserted; see test_benchmarks.py)."""

import pytest
from test_benchmarks import run_benchmark


def test_bench_posthoc_ema_prints_its_table():
    result = run_benchmark("bench_posthoc_ema.py", ["--num_channels", "32", "--repeats", "2", "--warmup", "1",
                                                    "--threads", "1", "--device", "cpu"])
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row[0] for row in rows] == ["| `--ema_rate 0.9999` (nn.update_ema)",
                                        "| `--ema_rate 0.9999,0.999` (nn.update_ema)",
                                        "| `--ema_std 0.05,0.10` (PowerFunctionEMA)"]
    copies, memory = [int(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert copies == [1, 2, 2] and memory[0] > 0 and memory[1] == memory[2] == pytest.approx(2 * memory[0], abs=0.1)
