"""The README's examples run as written (short versions)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_prune_hf_bert_example_prunes_and_reloads() -> None:
    pytest.importorskip("transformers")
    main = runpy.run_path(str(EXAMPLES / "prune_hf_bert.py"))["main"]
    result = main(["--steps", "40", "--beta-lr", "0.05"])
    assert result["reload_equal"]
    assert result["flops"][1] < result["flops"][0] and result["params"][1] < result["params"][0]
    assert any(live < total for live, total in result["widths"].values())


def test_prune_hf_causal_lm_example_reaches_its_target_and_reloads() -> None:
    pytest.importorskip("transformers")
    main = runpy.run_path(str(EXAMPLES / "prune_hf_causal_lm.py"))["main"]
    result = main(["--epochs", "1", "--target-flops", "0.33"])
    assert result["summary"]["ok"] and abs(result["reached"] / 0.33 - 1) <= 0.03, result["reached"]
    assert result["reload_equal"]
    assert result["loss_compacted"] == pytest.approx(result["loss_gated"], rel=1e-4)
    assert all(live < total for live, total in result["widths"].values())  # heads and MLP units both went
