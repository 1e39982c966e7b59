"""Client sampling: which participants train in a round, as a pure function of ``(seed, round)``.

Being a pure function makes sampling identical on every rank and unchanged by a resume. Two schemes:

- ``random``: each round draws its clients uniformly without replacement, independently of other rounds,
  so a client can go unvisited for many rounds;
- ``cyclic``: sampling without replacement across rounds. The participants are shuffled once per pass,
  the passes are concatenated, and round ``r`` takes the ``k`` slots ``(r-1)*k .. r*k-1`` of that sequence,
  so every client is visited once per pass (every ``n / k`` rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np

#: How clients are sampled per round (see the module docstring).
Sampling = Literal["random", "cyclic"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)


def random_indices(n: int, k: int, seed: int, round: int) -> list[int]:
    """``k`` distinct indices of ``range(n)`` drawn uniformly from ``default_rng([seed, round])``."""
    rng = np.random.default_rng([seed, round])
    return [int(i) for i in rng.choice(n, size=k, replace=False)]


def cyclic_order(n: int, k: int, seed: int, passes: int) -> list[int]:
    """The concatenated first ``passes`` passes of cyclic sampling: each pass a permutation of ``range(n)``.

    Pass ``p`` is ``range(n)`` shuffled by ``default_rng([seed, p])``. When ``k`` does not divide ``n`` a round
    can straddle two passes; then, so that the round holds no client twice, the slots it takes from the
    new pass go to the first clients of that pass's shuffled order that the round's slots of the previous
    pass do not hold, moved to the front in that order; the rest of the pass keeps its shuffled order. Each
    pass still holds every index exactly once.
    """
    order: list[int] = []
    for p in range(passes):
        shuffled = [int(i) for i in np.random.default_rng([seed, p]).permutation(n)]
        carried = (p * n) % k  # slots of the straddling round already taken from the previous pass
        tail = set(order[len(order) - carried :])
        front = [i for i in shuffled if i not in tail][: k - carried]
        order += front + [i for i in shuffled if i not in set(front)]
    return order


def cyclic_indices(n: int, k: int, seed: int, round: int) -> list[int]:
    """The ``k`` indices of ``range(n)`` of ``round`` under cyclic sampling (slots ``(round-1)*k .. round*k-1``
    of :func:`cyclic_order`)."""
    order = cyclic_order(n, k, seed, passes=(round * k - 1) // n + 1)
    return order[(round - 1) * k : round * k]


SAMPLERS: dict[str, Callable[[int, int, int, int], list[int]]] = {"random": random_indices, "cyclic": cyclic_indices}


def sample_clients(participants: Sequence[int], k: int, seed: int, round: int, sampling: Sampling) -> list[int]:
    """The ``k`` clients of ``round`` among ``participants``, sorted: a function of its arguments only.

    Args:
        participants: Ids of the clients that take part in the rounds, in a fixed order.
        k: How many clients the round samples (``1 <= k <= len(participants)``).
        seed: The federation's seed.
        round: The round, from 1.
        sampling: ``"random"`` or ``"cyclic"`` (see the module docstring).

    Raises:
        ValueError: for a ``k``, ``round`` or ``sampling`` outside those ranges.
    """
    if not 1 <= k <= len(participants):
        raise ValueError(f"cannot sample {k} of {len(participants)} clients")
    if round < 1:
        raise ValueError(f"rounds count from 1, got {round}")
    if sampling not in SAMPLERS:
        raise ValueError(f"federation.sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    picked = SAMPLERS[sampling](len(participants), k, seed, round)
    return sorted(participants[i] for i in picked)
