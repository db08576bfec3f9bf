"""benchmarks/profile_compacted.py runs end to end on a tiny setting and its categories add up."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profile_compacted_tiny_run_writes_consistent_results(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.profile_compacted", "--model", "resnet20", "--batch", "1",
           "--threads", "1", "--iters", "2", "--warmup", "1", "--blocks", "1", "--seconds", "0.01",
           "--conv-batch", "1", "--wide-streams", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "profile_resnet20_b1.json").read_text())
    assert (tmp_path / "profile_resnet20_b1.md").read_text().startswith("# Profile: resnet20 dense vs compacted")
    assert set(results["models"]) == {"dense", "compacted", "compacted_wide"}
    for key, m in results["models"].items():
        cats = m["categories_us"]
        assert set(cats) == {"convolution", "batch_norm", "relu/activation", "add (residual)",
                             "pad/index_copy/cat/zeros", "linear/pooling", "other/dispatch"}
        assert math.isclose(sum(cats.values()), m["total_us"], rel_tol=1e-9), key
        assert math.isclose(sum(m["shares"].values()), 1.0, rel_tol=1e-9), key
        assert m["total_us"] > 0 and cats["convolution"] > 0
        assert sum(m["flops"].values()) == m["flops_total"] > 0
        assert m["flops"]["convolution"] == sum(c["flops"] for c in m["convs"])  # hooks agree with the counter
        assert all(c["us"] > 0 for c in m["convs"])
    dense, small, wide = (results["models"][k] for k in ("dense", "compacted", "compacted_wide"))
    assert len(dense["convs"]) == len(small["convs"]) == 21
    assert dense["categories_us"]["pad/index_copy/cat/zeros"] == 0  # the dense model scatters nothing
    assert small["categories_us"]["pad/index_copy/cat/zeros"] > 0  # ScatterUnits' pads
    assert wide["flops_ratio"] < small["flops_ratio"]  # narrowed streams drop more FLOPs
    assert len(results["conv_microbench"]) > 0 and all(r["gflops"] > 0 for r in results["conv_microbench"])
