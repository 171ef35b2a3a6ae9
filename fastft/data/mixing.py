"""Multitask mixing: combine several datasets into one training stream.

Each task ``i`` with ``n_i`` examples gets a share ``p_i`` of the mixed epoch, either from
explicit weights (``p_i = w_i / sum(w)``) or from temperature sampling
(``p_i = n_i^(1/T) / sum_j n_j^(1/T)``, Arivazhagan et al. 2019, "Massively Multilingual NMT";
T = 1 is proportional to size, larger T flattens towards uniform so small tasks are not drowned).
Mixing general data in this way is also how users limit catastrophic forgetting.

Within a task, examples are drawn without replacement in a seeded shuffled order and the order
is reshuffled when a task is exhausted, so an up-sampled task repeats every example before
any example a third time. Every mixed example carries its ``task`` name; validation stays per
task (``DataBundle.tasks``) so the trainer reports a loss for each task and overall.
"""
from __future__ import annotations

import math
import random
from typing import Mapping

from fastft.errors import DataError


def mixing_probabilities(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None,
                         temperature: float = 1.0) -> dict[str, float]:
    """Share of each task in the mix (sums to 1).

    Args:
        sizes: ``{task: number of training examples}``.
        weights: ``{task: weight >= 0}``; when given, ``temperature`` is ignored. Tasks missing
            from ``weights`` are an error (a typo would otherwise drop a task silently).
        temperature: > 0; used when ``weights`` is None.
    """
    if not sizes:
        raise DataError("data.tasks: no tasks to mix")
    empty = [k for k, n in sizes.items() if n <= 0]
    if empty:
        raise DataError(f"data.tasks: task(s) {empty} have no training examples")
    if weights:
        unknown = sorted(set(weights) - set(sizes))
        missing = sorted(set(sizes) - set(weights))
        if unknown or missing:
            raise DataError(f"data.mix_weights: unknown task(s) {unknown}, missing task(s) {missing}; "
                            f"tasks are {sorted(sizes)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise DataError(f"data.mix_weights={dict(weights)}: weights must be >= 0 with a positive sum")
        raw = {k: float(weights[k]) for k in sizes}
    else:
        if not temperature > 0:
            raise DataError(f"data.mix_temperature={temperature}: expected a number > 0")
        raw = {k: n ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def _counts(probs: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding of ``probs * total`` so the counts sum exactly to ``total``."""
    exact = {k: p * total for k, p in probs.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    rest = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:rest]:
        counts[k] += 1
    return counts


def mix_tasks(tasks: Mapping[str, list[dict]], *, weights: Mapping[str, float] | None = None,
              temperature: float = 1.0, num_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Mix task datasets into one shuffled list.

    Args:
        tasks: ``{task: examples}`` (token or classification examples).
        weights / temperature: see :func:`mixing_probabilities`.
        num_examples: size of the mixed list; default the sum of the task sizes.
        seed: fixes the draw and the order.

    Returns:
        Examples (shallow copies) each with a ``task`` key.
    """
    sizes = {k: len(v) for k, v in tasks.items()}
    probs = mixing_probabilities(sizes, weights, temperature)
    total = num_examples if num_examples is not None else sum(sizes.values())
    counts = _counts(probs, total)
    rng = random.Random(seed)
    mixed = []
    for name in sorted(tasks):  # sorted: the draw does not depend on dict order
        pool = tasks[name]
        order: list[int] = []
        for _ in range(counts[name]):
            if not order:
                order = list(range(len(pool)))
                rng.shuffle(order)
            mixed.append({**pool[order.pop()], "task": name})
    rng.shuffle(mixed)
    return mixed


def tag_task(examples: list[dict], name: str) -> list[dict]:
    """Shallow copies of ``examples`` with ``task`` set (for per-task validation sets)."""
    return [{**e, "task": name} for e in examples]
