"""Tests for tapl.sampling: random and cyclic client sampling, and the demo's coverage of its last rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tapl.federation import FederationConfig
from tapl.sampling import cyclic_order, sample_clients

DEMO = Path(__file__).parents[1] / "experiments" / "demo.yaml"
CLIENTS = list(range(10))


def rounds_of(participants: list[int], k: int, seed: int, rounds: int, sampling: str = "cyclic") -> list[list[int]]:
    return [sample_clients(participants, k, seed, r, sampling) for r in range(1, rounds + 1)]


@pytest.mark.parametrize("sampling", ["random", "cyclic"])
def test_sampling_is_a_pure_function_of_seed_and_round(sampling: str) -> None:
    first = rounds_of(CLIENTS, 4, 3, 30, sampling)
    np.random.seed(123)  # the global RNG and the order of calls do not matter
    assert [sample_clients(CLIENTS, 4, 3, r, sampling) for r in reversed(range(1, 31))] == first[::-1]
    assert rounds_of(CLIENTS, 4, 4, 30, sampling) != first
    assert all(s == sorted(s) for s in first)


def test_random_sampling_is_the_seeded_uniform_draw_of_each_round() -> None:
    for r in range(1, 6):
        picked = np.random.default_rng([7, r]).choice(10, size=4, replace=False)
        assert sample_clients(CLIENTS, 4, 7, r, "random") == sorted(int(i) for i in picked)


@pytest.mark.parametrize(("n", "k"), [(10, 5), (10, 2), (12, 4), (6, 6), (5, 1)])
def test_cyclic_visits_every_client_once_per_pass_when_k_divides_n(n: int, k: int) -> None:
    participants = [100 + i for i in range(n)]  # ids need not be 0..n-1
    for seed in (0, 1):
        rounds = rounds_of(participants, k, seed, 4 * n // k)
        for p in range(4):
            one_pass = [c for s in rounds[p * n // k : (p + 1) * n // k] for c in s]
            assert sorted(one_pass) == participants
        assert len({tuple(s) for s in rounds}) > 1 or k == n


@pytest.mark.parametrize(("n", "k"), [(10, 4), (10, 3), (7, 5), (5, 4), (3, 2), (30, 7)])
def test_cyclic_never_samples_a_client_twice_in_a_round_and_keeps_passes_whole(n: int, k: int) -> None:
    for seed in range(5):
        rounds = rounds_of(list(range(n)), k, seed, 5 * n)
        assert all(len(set(s)) == k for s in rounds)
        order = cyclic_order(n, k, seed, passes=5)
        assert all(sorted(order[p * n : (p + 1) * n]) == list(range(n)) for p in range(5))
        # The rounds are the order's consecutive slices of k.
        assert [sorted(order[i : i + k]) for i in range(0, 5 * n - k + 1, k)] == rounds[: 5 * n // k]


def test_a_round_straddling_two_passes_takes_the_next_pass_s_first_new_clients() -> None:
    # n=5, k=4: round 2 takes slot 4 (the last of pass 0) and slots 5-7 (the first three of pass 1).
    first_pass = [int(i) for i in np.random.default_rng([0, 0]).permutation(5)]
    second = [int(i) for i in np.random.default_rng([0, 1]).permutation(5)]
    carried = first_pass[-1]
    taken = [c for c in second if c != carried][:3]
    assert cyclic_order(5, 4, 0, passes=2) == first_pass + taken + [c for c in second if c not in taken]
    assert sample_clients(list(range(5)), 4, 0, 2, "cyclic") == sorted([carried, *taken])


def test_cyclic_with_10_clients_and_4_per_round_covers_everyone_in_any_5_consecutive_rounds() -> None:
    for seed in range(10):
        rounds = rounds_of(CLIENTS, 4, seed, 60)
        for start in range(len(rounds) - 4):
            assert {c for s in rounds[start : start + 5] for c in s} == set(CLIENTS), (seed, start)


def test_random_sampling_can_miss_clients_in_the_last_quarter() -> None:
    # Why cyclic exists: with 10 clients, 4 per round and 16 rounds, some seed leaves a client out of rounds 13-16.
    missed = [
        seed
        for seed in range(20)
        if {c for s in rounds_of(CLIENTS, 4, seed, 16, "random")[12:] for c in s} != set(CLIENTS)
    ]
    assert missed


def test_bad_settings_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"federation\.sampling must be one of"):
        FederationConfig(sampling="round_robin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot sample 5 of 4 clients"):
        sample_clients([0, 1, 2, 3], 5, 0, 1, "cyclic")
    with pytest.raises(ValueError, match="rounds count from 1"):
        sample_clients([0, 1, 2, 3], 2, 0, 0, "cyclic")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_demo_samples_every_participant_in_its_last_quarter_of_rounds(seed: int) -> None:
    config = yaml.safe_load(DEMO.read_text())
    federation = FederationConfig(**{**config["federation"], "seed": seed})
    clients = range(sum(group.get("count", 1) for group in config["data"]["clients"]))
    participants = [c for c in clients if c not in set(federation.holdout_clients)]
    k = federation.num_sampled(len(participants))
    last_quarter = range(federation.rounds - federation.rounds // 4 + 1, federation.rounds + 1)
    sampled = {c for r in last_quarter for c in sample_clients(participants, k, seed, r, federation.sampling)}
    assert sampled == set(participants), (
        f"seed {seed}: clients {sorted(set(participants) - sampled)} miss rounds {last_quarter}"
    )
