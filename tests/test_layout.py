"""The library/lab split: the installed package is the library alone, the lab uses only its
public API, and models saved before the split still load."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

import torchdam as dam

ROOT = Path(__file__).resolve().parents[1]
LAB = ("baselines", "reproduce", "benchmarks")
FIXTURES = Path(__file__).with_name("fixtures")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def test_the_library_imports_nothing_from_the_lab() -> None:
    for path in (ROOT / "src" / "torchdam").rglob("*.py"):
        for module, _ in _imports(path):
            assert module.partition(".")[0] not in LAB, f"{path.relative_to(ROOT)} imports {module}"


def test_the_lab_uses_only_the_public_api() -> None:
    checked = 0
    for folder in LAB:
        for path in (ROOT / folder).rglob("*.py"):
            for module, names in _imports(path):
                if module.partition(".")[0] != "torchdam":
                    continue
                checked += 1
                where = f"{path.relative_to(ROOT)}: from {module} import {', '.join(names)}"
                assert not any(part.startswith("_") for part in module.split(".")), where
                assert not any(name.startswith("_") for name in names), where
    assert checked > 20


def test_the_wheel_holds_the_library_alone(tmp_path: Path) -> None:
    source = tmp_path / "checkout"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("torchdam-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "torchdam" in tops
    assert not tops & set(LAB), tops
    assert not {t for t in tops if not (t == "torchdam" or t.startswith("torchdam-"))}, tops


def test_a_model_saved_before_the_split_still_loads() -> None:
    folder = FIXTURES / "lenet5-compacted-v0.1.0"
    model = dam.load(folder)
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        assert torch.equal(model.eval()(expected["input"]), expected["output"])
