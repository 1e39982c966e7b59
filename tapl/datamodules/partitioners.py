"""Seeded partitioners that split the rows of one dataset split across federated clients.

A partition happens in two steps so that a client's train, validation and test splits line up:

1. :meth:`Partitioner.proportions` draws a ``(num_clients, num_classes)`` matrix ``P`` once per task from
   the task's *training* labels; ``P[c, k]`` is the share of class ``k``'s rows that client ``c`` gets.
2. :meth:`Partitioner.split` applies that same matrix to any split (train, validation, test), cutting each
   class's shuffled rows among the clients with largest-remainder rounding, so every row goes to exactly
   one client and each client sees the same label mix in all of its splits.

Partitioners: :class:`IID` (equal shares), :class:`Dirichlet` (label skew), :class:`Shards` (the pathological
sort-and-shard split) and :class:`Grouped` (the paper's pattern groups, which split a task first among client
groups and then, with another partitioner, within each group). The engine passes every partitioner each
holder's group id as ``groups``; all but :class:`Grouped` ignore it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = ["IID", "Dirichlet", "Grouped", "Partitioner", "Shards"]

# Tolerance under which a quota ``n * p`` counts as a whole number, so a matrix built from integer counts
# (``counts / n``) reproduces those counts exactly despite floating-point error.
_INTEGER_TOLERANCE = 1e-9


class Partitioner(ABC):
    """Base class: maps a label array to per-client index arrays.

    Subclasses implement :meth:`proportions`; :meth:`split` and :meth:`partition` are shared. Labels are
    integer class ids ``0 .. num_classes - 1``. The engine passes ``num_classes`` explicitly so that a class
    missing from the training split still gets a column, and its validation or test rows still have an
    owner.
    """

    @abstractmethod
    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Draw the class-share matrix for a task.

        Args:
            labels: 1-D integer class ids of the split the matrix is drawn from (the training split).
            num_clients: Number of clients, at least 1.
            num_classes: Number of classes ``K``; ``None`` means ``labels.max() + 1``. Must exceed every
                label.
            rng: Source of randomness; the same seed gives the same matrix.
            groups: Group id of each of the ``num_clients`` clients, in order. Only :class:`Grouped` uses
                it; other partitioners accept and ignore it, so the engine can always pass it.

        Returns:
            A float ``(num_clients, K)`` matrix ``P``; ``P[c, k]`` is the share of class ``k``'s rows that
            client ``c`` receives. Every column sums to 1.

        Raises:
            ValueError: If the labels, ``num_clients`` or ``num_classes`` are invalid, or the partitioner's
                constraints cannot be met.
        """

    def split(self, labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Cut each class's shuffled rows among clients according to ``proportions``.

        Class ``k``'s ``n_k`` rows are shuffled with ``rng`` and client ``c`` receives
        ``n_k * proportions[c, k]`` of them, rounded by the largest-remainder method; the union of the
        returned arrays is ``range(len(labels))`` and they are pairwise disjoint. Classes absent from
        ``labels`` simply contribute no rows.

        Args:
            labels: 1-D integer class ids of the split to cut (train, validation or test).
            proportions: A ``(num_clients, K)`` matrix from :meth:`proportions`, with ``K > labels.max()``.
            rng: Source of randomness for the within-class shuffle.

        Returns:
            One sorted ``int64`` array of row indices into ``labels`` per client.

        Raises:
            ValueError: If ``proportions`` is not a valid share matrix or does not cover every label.
        """
        proportions = _check_proportions(proportions)
        num_clients, num_classes = proportions.shape
        labels = _check_labels(labels, num_classes)
        counts = _allocate(np.bincount(labels, minlength=num_classes), proportions)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in range(num_classes):
            rows = np.flatnonzero(labels == k)
            if rows.size == 0:
                continue
            rows = rng.permutation(rows)
            bounds = np.cumsum(counts[:, k])[:-1]
            for client, chunk in enumerate(np.split(rows, bounds)):
                parts[client].append(chunk)
        return [np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else _empty() for chunks in parts]

    def partition(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> list[np.ndarray]:
        """Draw proportions from ``labels`` and split the same labels with them.

        A shortcut for a single split; to keep several splits aligned call :meth:`proportions` once and
        :meth:`split` on each.

        Args:
            labels: 1-D integer class ids.
            num_clients: Number of clients, at least 1.
            num_classes: Number of classes, or ``None`` for ``labels.max() + 1``.
            rng: Source of randomness.
            groups: Group id of each client (see :meth:`proportions`).

        Returns:
            One sorted ``int64`` array of row indices per client.
        """
        matrix = self.proportions(labels, num_clients, num_classes, rng, groups=groups)
        return self.split(labels, matrix, rng)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class IID(Partitioner):
    """Gives every client an equal share of every class.

    Rows are shuffled before they are cut, and leftover rows of each class go to different clients in turn,
    so client sizes differ by at most one row per class and, overall, by at most one row.
    """

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Return the uniform matrix ``1 / num_clients``; see :meth:`Partitioner.proportions`."""
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        _check_labels(labels, num_classes)
        return np.full((num_clients, num_classes), 1.0 / num_clients)


class Dirichlet(Partitioner):
    """Label-skewed partition: each class's shares across clients follow ``Dirichlet(alpha, ..., alpha)``.

    Small ``alpha`` (e.g. 0.1) gives each client a few dominant classes; large ``alpha`` (e.g. 100)
    approaches :class:`IID`. If a draw leaves a client with fewer than ``min_samples_per_client`` training
    rows, the matrix is redrawn a bounded number of times; if that still fails, rows are moved from the
    largest clients to the short ones, deterministically, and the returned matrix reflects the move.

    Args:
        alpha: Concentration of the Dirichlet prior, greater than 0.
        min_samples_per_client: Fewest rows of the drawing split (the training split) that any client may
            receive, at least 0.

    Raises:
        ValueError: If ``alpha <= 0`` or ``min_samples_per_client < 0``.
    """

    #: Fresh draws tried before falling back to moving rows between clients.
    max_redraws: int = 10

    def __init__(self, alpha: float = 0.5, min_samples_per_client: int = 1) -> None:
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be a finite number > 0, got alpha={alpha!r}.")
        if min_samples_per_client < 0:
            raise ValueError(
                f"min_samples_per_client must be >= 0, got min_samples_per_client={min_samples_per_client!r}."
            )
        self.alpha = float(alpha)
        self.min_samples_per_client = int(min_samples_per_client)

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Draw one Dirichlet column per class; see :meth:`Partitioner.proportions`.

        Raises:
            ValueError: Also if ``labels`` has fewer than ``num_clients * min_samples_per_client`` rows.
        """
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        labels = _check_labels(labels, num_classes)
        needed = num_clients * self.min_samples_per_client
        if labels.size < needed:
            raise ValueError(
                f"Cannot give each of {num_clients} clients min_samples_per_client="
                f"{self.min_samples_per_client} rows: the split has only {labels.size} rows "
                f"(needs {needed}). Lower min_samples_per_client or the number of clients."
            )
        class_sizes = np.bincount(labels, minlength=num_classes)
        matrix = self._draw(num_clients, num_classes, rng)
        for _ in range(self.max_redraws):
            if _allocate(class_sizes, matrix).sum(axis=1).min() >= self.min_samples_per_client:
                return matrix
            matrix = self._draw(num_clients, num_classes, rng)
        counts = _allocate(class_sizes, matrix)
        if counts.sum(axis=1).min() >= self.min_samples_per_client:
            return matrix
        counts = _top_up(counts, self.min_samples_per_client)
        present = class_sizes > 0
        # Classes absent from the drawing split keep their drawn column: only their val/test rows use it.
        matrix[:, present] = counts[:, present] / class_sizes[present]
        return matrix

    def _draw(self, num_clients: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        matrix = rng.dirichlet(np.full(num_clients, self.alpha), size=num_classes).T
        # For tiny alpha every gamma variate can underflow to 0 and numpy returns NaN; the limit of
        # Dirichlet(alpha -> 0) is a one-hot vector, so give such a class wholly to one random client.
        bad = ~np.isfinite(matrix).all(axis=0) | (matrix.sum(axis=0) <= 0)
        for k in np.flatnonzero(bad):
            matrix[:, k] = 0.0
            matrix[rng.integers(num_clients), k] = 1.0
        return matrix / matrix.sum(axis=0, keepdims=True)


class Shards(Partitioner):
    """The pathological non-IID split of McMahan et al. (2017): sorted by label, cut into shards, dealt out.

    The training rows are sorted by label and cut into ``num_clients * shards_per_client`` shards of equal
    size (sizes differ by at most one row), and each client receives ``shards_per_client`` shards chosen at
    random. A shard no larger than the smallest class spans at most two classes, so a client then sees at
    most ``2 * shards_per_client`` classes, and at most ``shards_per_client`` when the shards line up with
    class boundaries (every class size a multiple of one shared shard size). The deal is expressed as the
    share of each class's rows that each client got, so :meth:`Partitioner.split` reproduces it exactly on
    the training split and gives validation and test rows the same label mix. A class absent from the
    training split is shared equally among clients.

    Args:
        shards_per_client: Shards dealt to each client, at least 1.

    Raises:
        ValueError: If ``shards_per_client`` is not an integer >= 1.
    """

    def __init__(self, shards_per_client: int = 2) -> None:
        _check_positive_int("shards_per_client", shards_per_client)
        self.shards_per_client = int(shards_per_client)

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Deal label-sorted shards to clients; see :meth:`Partitioner.proportions`.

        Raises:
            ValueError: Also if ``labels`` has fewer rows than ``num_clients * shards_per_client`` shards.
        """
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        labels = _check_labels(labels, num_classes)
        num_shards = num_clients * self.shards_per_client
        if labels.size < num_shards:
            raise ValueError(
                f"Shards cannot cut {labels.size} training rows into num_clients * shards_per_client = "
                f"{num_clients} * {self.shards_per_client} = {num_shards} non-empty shards. Lower "
                "shards_per_client or the number of clients, or use more data (max_rows)."
            )
        # Only each shard's class counts matter (split shuffles rows within a class), so sorting the labels
        # themselves is enough.
        ordered = np.sort(labels)
        shard_sizes = np.full(num_shards, labels.size // num_shards)
        shard_sizes[: labels.size % num_shards] += 1
        owner = np.empty(num_shards, dtype=np.int64)
        owner[rng.permutation(num_shards)] = np.arange(num_shards) // self.shards_per_client
        counts = np.zeros((num_clients, num_classes), dtype=np.int64)
        np.add.at(counts, (np.repeat(owner, shard_sizes), ordered), 1)
        class_sizes = counts.sum(axis=0)
        matrix = np.full((num_clients, num_classes), 1.0 / num_clients)
        present = class_sizes > 0
        matrix[:, present] = counts[:, present] / class_sizes[present]
        return matrix


class Grouped(Partitioner):
    """The paper's pattern groups: split each task among client groups, then within each group.

    Clients belong to ``num_groups`` groups (in the paper, 30 clients = 3 groups x the same 10 task/modality
    patterns). Each group that holds at least one of the task's clients receives an equal share of every
    class's rows, ``1 / (number of groups holding the task)``: with every group holding the task (the
    paper's layout) that is ``1 / num_groups``, a third each for three groups; a group holding none of the
    task's clients takes no share, so no row is left without an owner. Within a group, ``within`` splits the
    group's share among the group's clients, drawing its matrix from the rows the group receives (so, for
    example, :class:`Dirichlet`'s ``min_samples_per_client`` applies to the group's rows). Clients of
    different groups never share a row; rounding to whole rows can move a group's total by less than one
    row per client of the group.

    Args:
        num_groups: Number of client groups, at least 1.
        within: How a group's share is split among its clients; ``None`` means :class:`IID`.

    Raises:
        ValueError: If ``num_groups`` is not an integer >= 1 or ``within`` is not a non-grouped
            :class:`Partitioner`.
    """

    def __init__(self, num_groups: int = 3, within: Partitioner | None = None) -> None:
        _check_positive_int("num_groups", num_groups)
        within = IID() if within is None else within
        if not isinstance(within, Partitioner) or isinstance(within, Grouped):
            raise ValueError(
                f"Grouped within must be a partitioner that splits one group (IID, Dirichlet, Shards), got "
                f"within={within!r}."
            )
        self.num_groups = int(num_groups)
        self.within = within

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
        *,
        groups: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Share each class equally among the groups holding the task, then split within each group.

        See :meth:`Partitioner.proportions`; here ``groups`` is required.

        Raises:
            ValueError: Also if ``groups`` is missing, does not give one id in ``[0, num_groups)`` per
                client, or ``within`` cannot split a group's rows (its message names the group).
        """
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        labels = _check_labels(labels, num_classes)
        group_of = self._check_groups(groups, num_clients)
        present = np.unique(group_of)
        share = 1.0 / present.size
        # The rows each group would receive, so that ``within`` draws from its group's share of the split.
        group_counts = _allocate(
            np.bincount(labels, minlength=num_classes), np.full((present.size, num_classes), share)
        )
        matrix = np.zeros((num_clients, num_classes))
        for row, group in enumerate(present):
            members = np.flatnonzero(group_of == group)
            group_labels = np.repeat(np.arange(num_classes), group_counts[row])
            try:
                inner = self.within.proportions(group_labels, members.size, num_classes, rng)
            except ValueError as error:
                raise ValueError(
                    f"Grouped: cannot split group {group} ({members.size} clients, {group_labels.size} rows) "
                    f"with within={self.within!r}: {error}"
                ) from error
            matrix[members] = share * _check_proportions(inner)
        return matrix

    def _check_groups(self, groups: Sequence[int] | None, num_clients: int) -> np.ndarray:
        if groups is None:
            raise ValueError(
                "Grouped needs client groups: pass groups=[group id of each client] (ids 0 .. "
                f"{self.num_groups - 1}) to proportions or partition, or use a partitioner that ignores "
                "groups (IID, Dirichlet, Shards)."
            )
        group_of = np.asarray(groups)
        if group_of.shape != (num_clients,):
            raise ValueError(
                f"Grouped groups must give one group id per client: expected {num_clients} ids, got shape "
                f"{group_of.shape}."
            )
        if not np.issubdtype(group_of.dtype, np.integer):
            raise ValueError(f"Grouped groups must be integer group ids, got dtype {group_of.dtype}.")
        if group_of.min() < 0 or group_of.max() >= self.num_groups:
            raise ValueError(
                f"Grouped groups must lie in [0, {self.num_groups - 1}] for num_groups={self.num_groups}, got "
                f"range [{group_of.min()}, {group_of.max()}]; raise num_groups or fix the client groups."
            )
        return group_of.astype(np.int64)


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}.")


def _check_num_clients(num_clients: int) -> None:
    _check_positive_int("num_clients", num_clients)


def _resolve_num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes!r}.")
        return int(num_classes)
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("Cannot infer num_classes from an empty label array; pass num_classes explicitly.")
    return int(labels.max()) + 1


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}.")
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got range [{labels.min()}, {labels.max()}]."
        )
    return labels.astype(np.int64)


def _check_proportions(proportions: np.ndarray) -> np.ndarray:
    matrix = np.asarray(proportions, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"proportions must be a (num_clients, num_classes) matrix, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("proportions must be finite and non-negative.")
    if not np.allclose(matrix.sum(axis=0), 1.0, atol=1e-6):
        raise ValueError("Every column of proportions must sum to 1 (each class's rows are shared out fully).")
    return matrix


def _allocate(class_sizes: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Round ``class_sizes[k] * proportions[:, k]`` to integers that sum to ``class_sizes[k]``.

    Largest-remainder rounding. Ties in the remainder go to clients in turn, starting after the client that
    last received a leftover row, so an even split (IID) does not always favour client 0. The result depends
    only on its inputs, which lets :class:`Dirichlet` predict exactly how :meth:`Partitioner.split` will cut
    the training split.

    Returns:
        An ``int64`` ``(num_clients, num_classes)`` matrix of row counts.
    """
    num_clients, num_classes = proportions.shape
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    start = 0
    for k in range(num_classes):
        size = int(class_sizes[k])
        if size == 0:
            continue
        column = proportions[:, k] / proportions[:, k].sum()
        quotas = size * column
        nearest = np.rint(quotas)
        quotas = np.where(np.abs(quotas - nearest) < _INTEGER_TOLERANCE, nearest, quotas)
        floors = np.floor(quotas).astype(np.int64)
        leftover = size - int(floors.sum())
        if leftover > 0:
            turn = (np.arange(num_clients) - start) % num_clients
            # lexsort sorts by the last key first: remainder descending, then turn order.
            order = np.lexsort((turn, -(quotas - floors)))
            floors[order[:leftover]] += 1
            start = (int(order[leftover - 1]) + 1) % num_clients
        counts[:, k] = floors
    return counts


def _top_up(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Move rows from the largest clients to those below ``minimum`` until every client has ``minimum``.

    Deterministic and bounded: each move lowers the total shortfall by at least one row. The caller
    guarantees ``counts.sum() >= counts.shape[0] * minimum``, so a donor above the minimum always exists.
    """
    counts = counts.copy()
    totals = counts.sum(axis=1)
    while (short := np.flatnonzero(totals < minimum)).size:
        receiver = int(short[0])
        donor = int(np.argmax(totals))
        k = int(np.argmax(counts[donor]))
        moved = int(min(minimum - totals[receiver], totals[donor] - minimum, counts[donor, k]))
        counts[donor, k] -= moved
        counts[receiver, k] += moved
        totals[donor] -= moved
        totals[receiver] += moved
    return counts
