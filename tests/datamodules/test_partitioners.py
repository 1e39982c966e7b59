"""Tests for tapl.datamodules.partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from tapl.datamodules.partitioners import IID, Dirichlet, Grouped, Partitioner, Shards


def _labels(num_rows: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(num_classes, size=num_rows)


def _assert_disjoint_cover(parts: list[np.ndarray], num_rows: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and unique"
    merged = np.concatenate(parts)
    assert merged.size == num_rows, "no row is given to two clients"
    np.testing.assert_array_equal(np.sort(merged), np.arange(num_rows))


def _mean_total_variation(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    overall = np.bincount(labels, minlength=num_classes) / labels.size
    distances = [
        0.5 * np.abs(np.bincount(labels[part], minlength=num_classes) / part.size - overall).sum()
        for part in parts
        if part.size
    ]
    return float(np.mean(distances))


def test_iid_gives_equal_shares_of_every_class() -> None:
    labels = _labels(1003, 7)
    partitioner = IID()
    parts = partitioner.partition(labels, 6, None, np.random.default_rng(0))
    _assert_disjoint_cover(parts, labels.size)
    per_client = np.stack([np.bincount(labels[part], minlength=7) for part in parts])
    assert (per_client.max(axis=0) - per_client.min(axis=0) <= 1).all()
    totals = per_client.sum(axis=1)
    assert totals.max() - totals.min() <= 1
    np.testing.assert_allclose(partitioner.proportions(labels, 6, None, np.random.default_rng(0)), 1 / 6)


def test_iid_shuffles_rows_within_classes() -> None:
    labels = np.zeros(100, dtype=np.int64)
    parts = IID().partition(labels, 2, 1, np.random.default_rng(0))
    assert not np.array_equal(parts[0], np.arange(50))


@pytest.mark.parametrize("num_clients", [1, 2, 10, 37])
@pytest.mark.parametrize("partitioner", [IID(), Dirichlet(alpha=0.3), Shards(shards_per_client=3)])
def test_partition_is_a_disjoint_cover(partitioner: Partitioner, num_clients: int) -> None:
    labels = _labels(997, 10)
    parts = partitioner.partition(labels, num_clients, 10, np.random.default_rng(1))
    assert len(parts) == num_clients
    _assert_disjoint_cover(parts, labels.size)


def test_proportion_columns_sum_to_one() -> None:
    labels = _labels(500, 5)
    matrix = Dirichlet(alpha=0.5).proportions(labels, 8, 5, np.random.default_rng(0))
    assert matrix.shape == (8, 5)
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)


def test_same_seed_same_partition_different_seed_different() -> None:
    labels = _labels(800, 10)
    partitioner = Dirichlet(alpha=0.5)

    def run(seed: int) -> list[np.ndarray]:
        return partitioner.partition(labels, 5, 10, np.random.default_rng(seed))

    first, again, other = run(3), run(3), run(4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = _labels(5000, 10)
    skew = {
        alpha: np.mean(
            [
                _mean_total_variation(
                    labels, Dirichlet(alpha=alpha).partition(labels, 10, 10, np.random.default_rng(seed)), 10
                )
                for seed in range(3)
            ]
        )
        for alpha in (0.1, 100.0)
    }
    assert skew[0.1] > 0.4
    assert skew[100.0] < 0.1


def test_min_samples_per_client_is_honoured() -> None:
    # Very small alpha with few rows per client makes empty clients near certain without the top-up.
    labels = _labels(60, 3)
    partitioner = Dirichlet(alpha=0.01, min_samples_per_client=5)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        matrix = partitioner.proportions(labels, 12, 3, rng)
        parts = partitioner.split(labels, matrix, rng)
        _assert_disjoint_cover(parts, labels.size)
        assert min(part.size for part in parts) >= 5


def test_min_samples_exactly_feasible() -> None:
    labels = _labels(40, 4)
    parts = Dirichlet(alpha=0.05, min_samples_per_client=4).partition(labels, 10, 4, np.random.default_rng(0))
    assert [part.size for part in parts] == [4] * 10


def test_impossible_min_samples_raises() -> None:
    labels = _labels(20, 2)
    with pytest.raises(ValueError, match="min_samples_per_client"):
        Dirichlet(min_samples_per_client=3).proportions(labels, 7, 2, np.random.default_rng(0))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_raises(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        Dirichlet(alpha=alpha)


def test_invalid_arguments_raise() -> None:
    labels = _labels(50, 3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_clients"):
        IID().proportions(labels, 0, 3, rng)
    with pytest.raises(ValueError, match="num_classes"):
        Dirichlet().proportions(labels, 2, 2, rng)
    with pytest.raises(ValueError, match="sum to 1"):
        IID().split(labels, np.full((2, 3), 0.3), rng)
    with pytest.raises(ValueError, match="min_samples_per_client"):
        Dirichlet(min_samples_per_client=-1)


def test_one_matrix_gives_aligned_label_mixes_across_splits() -> None:
    num_classes = 10
    train, test = _labels(6000, num_classes, seed=1), _labels(3000, num_classes, seed=2)
    partitioner = Dirichlet(alpha=0.3)
    rng = np.random.default_rng(0)
    matrix = partitioner.proportions(train, 5, num_classes, rng)
    train_parts, test_parts = partitioner.split(train, matrix, rng), partitioner.split(test, matrix, rng)
    _assert_disjoint_cover(test_parts, test.size)
    for train_part, test_part in zip(train_parts, test_parts, strict=True):
        train_mix = np.bincount(train[train_part], minlength=num_classes) / train_part.size
        test_mix = np.bincount(test[test_part], minlength=num_classes) / test_part.size
        assert 0.5 * np.abs(train_mix - test_mix).sum() < 0.05
        assert abs(test_part.size / test.size - train_part.size / train.size) < 0.02


def test_split_handles_classes_missing_from_either_split() -> None:
    train = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    test = np.array([2, 2, 2, 0])  # class 2 never appears in training
    partitioner = Dirichlet(alpha=1.0)
    rng = np.random.default_rng(0)
    matrix = partitioner.proportions(train, 3, 3, rng)
    _assert_disjoint_cover(partitioner.split(test, matrix, rng), test.size)
    _assert_disjoint_cover(partitioner.split(np.array([], dtype=np.int64), matrix, rng), 0)
    with pytest.raises(ValueError, match="labels"):
        partitioner.split(np.array([3]), matrix, rng)


def test_tiny_alpha_never_produces_nan() -> None:
    labels = _labels(300, 20)
    matrix = Dirichlet(alpha=1e-4, min_samples_per_client=0).proportions(labels, 4, 20, np.random.default_rng(0))
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)


# -- Shards --------------------------------------------------------------------------------------------------


def _classes_seen(labels: np.ndarray, parts: list[np.ndarray]) -> list[int]:
    return [np.unique(labels[part]).size for part in parts]


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_give_each_client_few_classes(shards_per_client: int) -> None:
    # Aligned: 10 classes x 120 rows, 10 clients; every shard lies within one class.
    aligned = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 120))
    parts = Shards(shards_per_client).partition(aligned, 10, 10, np.random.default_rng(0))
    _assert_disjoint_cover(parts, aligned.size)
    assert max(_classes_seen(aligned, parts)) <= shards_per_client
    assert [part.size for part in parts] == [120] * 10
    # Unequal class sizes: a shard may straddle one class boundary.
    labels = _labels(1003, 10)
    parts = Shards(shards_per_client).partition(labels, 10, 10, np.random.default_rng(0))
    _assert_disjoint_cover(parts, labels.size)
    assert max(_classes_seen(labels, parts)) <= 2 * shards_per_client
    sizes = [part.size for part in parts]
    assert max(sizes) - min(sizes) <= shards_per_client
    # Far more skewed than IID, which gives every client all 10 classes.
    assert np.mean(_classes_seen(labels, parts)) < shards_per_client + 1.5


def test_shards_are_seeded() -> None:
    labels = _labels(600, 10)

    def run(seed: int) -> list[np.ndarray]:
        return Shards().partition(labels, 6, 10, np.random.default_rng(seed))

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_shards_val_and_test_follow_train() -> None:
    num_classes = 10
    train, test = _labels(5000, num_classes, seed=1), _labels(2500, num_classes, seed=2)
    partitioner = Shards(shards_per_client=2)
    rng = np.random.default_rng(0)
    matrix = partitioner.proportions(train, 8, num_classes, rng)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)
    train_parts, test_parts = partitioner.split(train, matrix, rng), partitioner.split(test, matrix, rng)
    _assert_disjoint_cover(test_parts, test.size)
    for train_part, test_part in zip(train_parts, test_parts, strict=True):
        assert set(np.unique(test[test_part])) <= set(np.unique(train[train_part]))
        train_mix = np.bincount(train[train_part], minlength=num_classes) / train_part.size
        test_mix = np.bincount(test[test_part], minlength=num_classes) / test_part.size
        assert 0.5 * np.abs(train_mix - test_mix).sum() < 0.05


def test_shards_share_classes_missing_from_training() -> None:
    train = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    matrix = Shards(1).proportions(train, 4, 3, np.random.default_rng(0))
    np.testing.assert_allclose(matrix[:, 2], 0.25)
    _assert_disjoint_cover(Shards(1).split(np.array([2, 2, 0, 1, 2]), matrix, np.random.default_rng(0)), 5)


def test_shards_invalid_arguments_raise() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="shards_per_client"):
            Shards(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"19 training rows .* 20 non-empty shards"):
        Shards(2).proportions(_labels(19, 3), 10, 3, np.random.default_rng(0))


# -- Grouped -------------------------------------------------------------------------------------------------

# Three groups holding 2, 3 and 4 clients of the task, interleaved as the engine lists holders.
_GROUPS = [0, 1, 2, 2, 1, 0, 2, 1, 2]


def test_grouped_gives_each_group_a_third_of_every_class() -> None:
    num_classes = 7
    train, test = _labels(3001, num_classes, seed=1), _labels(1500, num_classes, seed=2)
    partitioner = Grouped(num_groups=3)
    rng = np.random.default_rng(0)
    matrix = partitioner.proportions(train, len(_GROUPS), num_classes, rng, groups=_GROUPS)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0)
    groups = np.asarray(_GROUPS)
    for labels in (train, test):
        parts = partitioner.split(labels, matrix, rng)
        _assert_disjoint_cover(parts, labels.size)  # so clients of different groups never share rows
        class_sizes = np.bincount(labels, minlength=num_classes)
        for group in range(3):
            members = np.flatnonzero(groups == group)
            np.testing.assert_allclose(matrix[members].sum(axis=0), 1 / 3)
            got = sum(np.bincount(labels[parts[c]], minlength=num_classes) for c in members)
            assert (np.abs(got - class_sizes / 3) < members.size).all()
            # IID within a group: its clients get equal shares of the group's third.
            sizes = [parts[c].size for c in members]
            assert max(sizes) - min(sizes) <= num_classes


def test_grouped_splits_among_groups_that_hold_the_task() -> None:
    labels = _labels(900, 4)
    groups = [2, 0, 2, 0]  # group 1 holds none of this task's clients
    matrix = Grouped(num_groups=3).proportions(labels, 4, 4, np.random.default_rng(0), groups=groups)
    np.testing.assert_allclose(matrix, 0.25)
    np.testing.assert_allclose(matrix[[1, 3]].sum(axis=0), 0.5)


def test_grouped_is_seeded() -> None:
    labels = _labels(900, 10)
    partitioner = Grouped(within=Dirichlet(alpha=0.5))

    def run(seed: int) -> list[np.ndarray]:
        return partitioner.partition(labels, len(_GROUPS), 10, np.random.default_rng(seed), groups=_GROUPS)

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_grouped_within_dirichlet_skews_inside_groups() -> None:
    labels = _labels(6000, 10)
    groups = np.asarray(_GROUPS)

    def skew(within: Partitioner) -> float:
        parts = Grouped(within=within).partition(labels, groups.size, 10, np.random.default_rng(0), groups=_GROUPS)
        return _mean_total_variation(labels, parts, 10)

    assert skew(Dirichlet(alpha=0.1)) > 0.3
    assert skew(IID()) < 0.05
    matrix = Grouped(within=Dirichlet(alpha=0.1)).proportions(
        labels, groups.size, 10, np.random.default_rng(0), groups=_GROUPS
    )
    for group in range(3):
        np.testing.assert_allclose(matrix[groups == group].sum(axis=0), 1 / 3)


def test_grouped_within_shards_keeps_few_classes_per_client() -> None:
    labels = _labels(3000, 10)
    parts = Grouped(within=Shards(1)).partition(labels, len(_GROUPS), 10, np.random.default_rng(0), groups=_GROUPS)
    _assert_disjoint_cover(parts, labels.size)
    # A group's third is sorted and cut into one shard per client; a shard of >= 250 rows spans few classes.
    assert max(_classes_seen(labels, parts)) <= 6


def test_grouped_needs_valid_groups() -> None:
    labels = _labels(90, 3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Grouped needs client groups"):
        Grouped().proportions(labels, 3, 3, rng)
    with pytest.raises(ValueError, match="one group id per client"):
        Grouped().proportions(labels, 3, 3, rng, groups=[0, 1])
    with pytest.raises(ValueError, match="num_groups=3"):
        Grouped().proportions(labels, 3, 3, rng, groups=[0, 1, 3])
    with pytest.raises(ValueError, match="integer"):
        Grouped().proportions(labels, 2, 3, rng, groups=[0.0, 1.0])
    with pytest.raises(ValueError, match="num_groups"):
        Grouped(num_groups=0)
    with pytest.raises(ValueError, match="within"):
        Grouped(within=Grouped())
    with pytest.raises(ValueError, match=r"group 1 .*min_samples_per_client"):
        Grouped(within=Dirichlet(min_samples_per_client=25)).proportions(labels, 3, 3, rng, groups=[0, 1, 1])


@pytest.mark.parametrize("partitioner", [IID(), Dirichlet(alpha=0.5), Shards(2)])
def test_other_partitioners_ignore_groups(partitioner: Partitioner) -> None:
    labels = _labels(400, 5)
    plain = partitioner.proportions(labels, 4, 5, np.random.default_rng(0))
    grouped = partitioner.proportions(labels, 4, 5, np.random.default_rng(0), groups=[0, 1, 2, 0])
    np.testing.assert_array_equal(plain, grouped)
