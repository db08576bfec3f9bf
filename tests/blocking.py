"""Run a loader in a thread, so a test fails instead of hanging when it blocks (a FIFO)."""
from __future__ import annotations

import threading
from typing import Callable


def outcome_in_thread(fn: Callable[[], object], what: str, timeout: float = 10.0) -> BaseException | None:
    """``fn()``'s exception (None if it returned); fails the test if it is still blocked after ``timeout``."""
    outcome: list = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} blocked on a special file"
    return outcome[0]
