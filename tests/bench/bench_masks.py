"""Privacy mask cost at 720p, against copying the same frame (the cheapest thing a frame can cost).

Run alone: ``python -m tests.bench.bench_masks``.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import numpy as np

from agent.buffer.masks import PrivacyMask
from tests.bench.report import Report

W, H = 1280, 720
# A typical resident's mask: the neighbour's house on the right, a strip of pavement along the bottom.
POLYGONS = [
    [[900, 0], [1280, 0], [1280, 420], [900, 380]],
    [[0, 620], [1280, 600], [1280, 720], [0, 720]],
]


def _per_frame_ms(fn: Callable[[], object], number: int = 200, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1000


def _pair(ours: Callable[[], object], reference: Callable[[], object]) -> tuple[float, float]:
    """Both timed in alternation, best of several rounds: the machine is shared and its load drifts."""
    a, b = [], []
    for _ in range(5):
        a.append(_per_frame_ms(ours, repeat=1))
        b.append(_per_frame_ms(reference, repeat=1))
    return min(a), min(b)


def run(report: Report) -> None:
    image = np.random.default_rng(7).integers(0, 255, (H, W, 3), dtype=np.uint8)
    mask = PrivacyMask(POLYGONS, W, H)
    full = PrivacyMask([[[0, 0], [W, 0], [W, H], [0, H]]], W, H)
    copy = image.copy
    report("PrivacyMask.apply 720p (new frame)", *_pair(lambda: mask.apply(image), copy),
           "ms/frame", "about one frame copy (ratio <= 2)")
    report("PrivacyMask.apply 720p (in place)", *_pair(lambda: mask.apply(image, inplace=True), copy),
           "ms/frame", "cheaper than a frame copy (ratio < 1)")
    report("PrivacyMask.apply 720p, whole picture masked (in place)",
           *_pair(lambda: full.apply(image, inplace=True), copy), "ms/frame", "worst case about one frame copy")


if __name__ == "__main__":
    run(Report())
