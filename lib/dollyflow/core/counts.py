"""Stage-to-stage accounting (engine-free).

The jobs measure each number from the data it describes (lines parsed, rows a commit added, rows
of a table version, rows of the files written) and compare them across stages: silver rows =
tokenized + dropped, manifest records = rows in the shards = rows of the ``tokenized`` commit,
lines read = rows new + rows existing + rows quarantined. A disagreement is a bug or a
concurrent change the job did not account for, never something to report and move on from:
:func:`expect_equal` raises :class:`CountMismatch` with both numbers and where they came from.
"""
from __future__ import annotations

import time


class CountMismatch(RuntimeError):
    """Two measurements of the same quantity disagree."""

    def __init__(self, what: str, left: tuple[str, int], right: tuple[str, int]):
        self.what, self.left, self.right = what, left, right
        (ln, lv), (rn, rv) = left, right
        super().__init__(f"{what}: {ln} = {lv}, but {rn} = {rv} (difference {rv - lv:+d})")


def expect_equal(what: str, left: tuple[str, int], right: tuple[str, int]) -> int:
    """Return the value when ``left`` and ``right`` (each ``(where it was measured, value)``)
    agree; raise :class:`CountMismatch` naming both otherwise."""
    if int(left[1]) != int(right[1]):
        raise CountMismatch(what, (left[0], int(left[1])), (right[0], int(right[1])))
    return int(left[1])


def expect_equal_maps(what: str, left: tuple[str, dict], right: tuple[str, dict]) -> None:
    """Per-key :func:`expect_equal` of two ``{key: count}`` maps (a key missing on one side is 0)."""
    for key in sorted(set(left[1]) | set(right[1])):
        expect_equal(f"{what} [{key}]", (left[0], int(left[1].get(key, 0))), (right[0], int(right[1].get(key, 0))))


class StepClock:
    """Seconds per named step of a job, accumulated into ``timings`` (a summary's ``step_seconds``,
    rounded to ``digits``; None: nothing is recorded): each call closes the step that began at
    the previous call (or at construction)."""

    def __init__(self, timings: dict | None, digits: int = 3):
        self.timings, self.digits, self.t = timings, digits, time.time()

    def __call__(self, step: str) -> None:
        now = time.time()
        if self.timings is not None:
            self.timings[step] = round(self.timings.get(step, 0.0) + now - self.t, self.digits)
        self.t = now
