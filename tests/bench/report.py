"""How every benchmark prints a figure: beside its same-run reference, as a ratio."""

from __future__ import annotations


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str, str]] = []

    def __call__(self, name: str, ours: float, reference: float, unit: str, goal: str) -> None:
        ratio = ours / reference if reference else float("inf")
        self.rows.append((name, ours, reference, unit, goal))
        print(f"  {name:<58} {ours:>12.4g} {unit:<8} ref {reference:>12.4g} {unit:<8} ratio {ratio:>7.3f}   goal {goal}",
              flush=True)
