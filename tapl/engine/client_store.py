"""Every client's own state (personal models, heads, loss histories), kept by the engine between visits."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tapl.errors import TaplError

#: The key of a checkpointed index of client stores kept on disk (see :mod:`tapl.engine.disk_store`).
ON_DISK_KEY = "__on_disk__"


class ClientStateError(TaplError, ValueError):
    """A visit left its client's state unusable (e.g. a personal model with NaN values)."""


class ClientStore:
    """Client id -> that client's store (a dict), as :attr:`ClientContext.store` sees it.

    A visit works on a copy (:meth:`checkout`) that becomes the client's state only once the visit succeeded
    (:meth:`commit`), so a failed visit leaves it as it was. The stores are checkpointed with the run.
    """

    def __init__(self) -> None:
        self._stores: dict[int, dict[str, Any]] = {}

    def checkout(self, client: int) -> dict[str, Any]:
        """A private copy of ``client``'s store (empty before anything was kept)."""
        return copy.deepcopy(self._stores.get(client, {}))

    def commit(self, client: int, store: dict[str, Any]) -> None:
        """Keep ``store`` as ``client``'s state.

        Raises:
            ClientStateError: if a tensor in it holds NaN or infinite values; the previous state is kept.
        """
        self.check(store)
        self._stores[client] = store

    @staticmethod
    def check(store: Mapping[str, Any]) -> None:
        """Refuse a store whose tensors hold NaN or infinite values.

        Raises:
            ClientStateError: naming the first offending tensors.
        """
        bad = [path for key, value in sorted(store.items()) for path in non_finite(value, key)]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ClientStateError(f"the client's state holds non-finite values (NaN or infinity) in {shown}")

    def __contains__(self, client: object) -> bool:
        return client in self._stores

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._stores))

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every client's store, by client id as a string (for a checkpoint)."""
        return {str(client): store for client, store in self._stores.items()}

    def load_state_dict(self, state: Mapping[str, dict[str, Any]]) -> None:
        """Replace every store by those of :meth:`state_dict`.

        Raises:
            ClientStateError: for the index of stores kept on disk (``federation.client_store: disk``).
        """
        if ON_DISK_KEY in state:
            raise ClientStateError("the checkpoint's client states are on disk: use federation.client_store disk")
        self._stores = {int(client): dict(store) for client, store in state.items()}


def non_finite(value: Any, path: str) -> list[str]:
    """The paths (``personal/head[a]/weight``) of the tensors in ``value`` (nested in dicts, lists and tuples)
    that hold NaN or infinite values."""
    if isinstance(value, torch.Tensor):
        return [] if not value.is_floating_point() or bool(torch.isfinite(value).all()) else [path]
    if isinstance(value, Mapping):
        return [p for key, item in value.items() for p in non_finite(item, f"{path}/{key}")]
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in non_finite(item, f"{path}/{i}")]
    return []
