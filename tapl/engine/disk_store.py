"""Every client's own state on disk (``federation.client_store: disk``): one safetensors file per client and version,
read only when the client's work checks it out, so that memory holds the sampled clients' stores and an index.

A commit writes the client's next version and removes the older ones, except the version the run's last
checkpoint holds, which a resume reads back. A checkpoint thus holds the index (client -> version), not the stores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tapl.engine.client_store import ON_DISK_KEY, ClientStore
from tapl.errors import TaplError

_STRUCTURE = "tapl_structure"


class ClientStoreFileError(TaplError, FileNotFoundError):
    """A client's stored state is missing on disk (e.g. a resume from a checkpoint older than the last)."""


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` under their index."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"a client's store on disk needs string keys, got {key!r}")
        return {"dict": {k: _split(v, tensors) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"list": [_split(v, tensors) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"a client's store on disk holds tensors, numbers, strings, lists and dicts; got {type(value)}")


def _join(node: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _join(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_join(v, tensors) for v in node["list"]]
    return node["value"]


class DiskClientStore(ClientStore):
    """Client id -> that client's store, kept in ``root`` (see the module).

    Args:
        root: The directory of the stores (created when needed).
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self._versions: dict[int, int] = {}
        self._checkpointed: dict[int, int] = {}

    def _path(self, client: int, version: int) -> Path:
        return self.root / f"client-{client}" / f"{version:06d}.safetensors"

    def checkout(self, client: int) -> dict[str, Any]:
        """``client``'s store, read from disk (empty before anything was kept)."""
        if client not in self._versions:
            return {}
        path = self._path(client, self._versions[client])
        if not path.is_file():
            raise ClientStoreFileError(
                f"client {client}'s state (version {self._versions[client]}) is missing: {path} (a resume reads the "
                "run's last checkpoint; an older one's client states are gone)"
            )
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
            structure = json.loads(file.metadata()[_STRUCTURE])
        return _join(structure, tensors)

    def commit(self, client: int, store: dict[str, Any]) -> None:
        """Write ``store`` as ``client``'s next version (see :meth:`ClientStore.commit` for the checks)."""
        self.check(store)
        tensors: dict[str, torch.Tensor] = {}
        structure = json.dumps(_split(store, tensors))
        version = self._versions.get(client, 0) + 1
        path = self._path(client, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={_STRUCTURE: structure})
        partial.replace(path)
        self._versions[client] = version
        keep = {path.name, self._path(client, self._checkpointed.get(client, 0)).name}
        for old in path.parent.glob("*.safetensors"):
            if old.name not in keep:
                old.unlink()

    def __contains__(self, client: object) -> bool:
        return client in self._versions

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._versions))

    def state_dict(self) -> dict[str, Any]:
        """The index of the stores on disk (for a checkpoint, which then holds their versions)."""
        self._checkpointed = dict(self._versions)
        return {ON_DISK_KEY: {str(client): version for client, version in self._versions.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stores of an in-memory checkpoint are written to disk."""
        if ON_DISK_KEY in state:
            self._versions = {int(client): int(version) for client, version in state[ON_DISK_KEY].items()}
            self._checkpointed = dict(self._versions)
            return
        self._versions, self._checkpointed = {}, {}
        for client, store in state.items():
            self.commit(int(client), dict(store))
