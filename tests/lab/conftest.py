"""Every test under tests/lab/ exercises the lab (baselines/, reproduce/, benchmarks/), not
the library: marked ``lab`` so ``pytest -m "not lab"`` runs the library's suite alone."""
import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in item.nodeid:
            item.add_marker(pytest.mark.lab)
