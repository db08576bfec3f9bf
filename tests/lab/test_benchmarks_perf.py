"""benchmarks/perf.py --quick runs end to end and checks ONNX/compile equality."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if os.environ.get("CI"):  # CI installs the perf extra: a missing package there is a failure
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
else:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")


def test_perf_quick_writes_results_and_checks_onnx(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "perf.json").read_text())
    assert (tmp_path / "perf.md").read_text().startswith("# torchdam performance (quick)")
    assert results["failed_checks"] == []
    assert [r["mode"] for r in results["gate_overhead"]] == ["eager", "compiled (aot_eager)"]
    assert all(r["ratio"] > 0 for r in results["gate_overhead"])
    (compacted,) = results["compacted"]
    assert compacted["flops_ratio"] > 1.5
    assert {(r["runtime"], r["batch"]) for r in compacted["runs"]} == {
        ("eager", 1), ("eager", 64), ("onnxruntime", 1), ("onnxruntime", 64)}
    assert all(check["equal"] and check["max_abs_diff"] <= check["tolerance"]
               for check in compacted["onnx_check"].values())
    assert results["compile"]["train_gated"]["equal"]
    assert all(c["equal"] for c in results["compile"]["compacted"])


def test_onnx_model_needs_optional_packages(monkeypatch):
    import builtins

    import torch
    from torch import nn

    from torchdam import ConfigError
    from torchdam.count import OnnxModel

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ConfigError, match="pip install onnxruntime onnx"):
        OnnxModel(nn.Linear(2, 2), torch.randn(1, 2), "unused.onnx")
