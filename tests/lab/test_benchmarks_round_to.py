"""benchmarks/round_to.py --quick runs end to end: rounded widths, FLOPs under the target,
a timed pair per pattern."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_round_to_quick_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.round_to", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "round_to.json").read_text())
    (row,) = results["rows"]
    assert row["round_to"] == 4 and row["model"] == "lenet5"
    assert all(v % 4 == 0 or v == n for v, n in zip(row["live"].values(), row["widths"].values()))
    assert row["flops"] <= 0.5 * 1.03 and row["flops_round_to_1"] <= 0.5 * 1.03
    assert row["speedup_b1"]["median"] > 0 and row["speedup_b1"]["pairs"] == 4
    (summary,) = results["summary"]
    assert summary["within_round_to_1"] == 1 and summary["runs"] == 1
    assert "| lenet5 | 50% | 4 |" in (tmp_path / "round_to.md").read_text()
