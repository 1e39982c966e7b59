"""A node's own disk copy of its clients' stores, by version: what keeps personal state on the client's machine
across messages, restarts and resumed runs of a distributed runtime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tapl.datamodules.sources import cache_dir
from tapl.engine.clients import ClientWorker

#: The node config key of the directory where a node keeps its clients' stores (default: tapl's cache).
STATE_DIR = "tapl-state-dir"


def node_state_dir(node_config: Mapping[str, Any]) -> Path:
    """Where a node keeps its clients' stores: its node config's ``tapl-state-dir``, else ``flower-nodes`` in
    tapl's cache (``$TAPL_CACHE``, ``~/.cache/tapl``)."""
    if STATE_DIR in node_config:
        return Path(str(node_config[STATE_DIR])).expanduser()
    return cache_dir() / "flower-nodes"


class NodeStores:
    """A client's stores on its node's disk: one file per version, the version named by the piece of work that
    made it (``round-000003``: the visit of round 3; ``post-federation``).

    The server says which version a piece of work starts from (the last one it accepted, so a visit it counted
    as failed is forgotten here too) and which version its last checkpoint holds; every other file goes once a
    new version is written. A resumed server therefore finds the versions of its checkpoint, and a restarted
    node the versions it had.

    Args:
        root: The node's state directory (:func:`node_state_dir`).
        run: The tapl run (a key the server makes once and keeps in its checkpoints).
        client: The node's client.
    """

    def __init__(self, root: Path, run: str, client: int) -> None:
        self.client = client
        self.dir = root / run / f"client-{client}"

    def load(self, worker: ClientWorker, version: str) -> None:
        """Put ``version`` of the client's stores (empty for ``""``) into ``worker``, and nothing else.

        Raises:
            FileNotFoundError: if the node does not hold that version.
        """
        kept: dict[str, Any] = {}
        if version:
            path = self.dir / f"{version}.pt"
            if not path.is_file():
                raise FileNotFoundError(
                    f"the node holds no version {version} of client {self.client}'s state in {self.dir} "
                    "(its state directory was deleted, or the client moved to another node)"
                )
            kept = torch.load(path, weights_only=True)
        for name, store in (("store", worker.store), ("engine_store", worker.engine_store)):
            store.load_state_dict({str(self.client): kept[name]} if name in kept else {})

    def save(self, worker: ClientWorker, version: str, keep: set[str]) -> None:
        """Write the worker's stores of the client as ``version``; remove every other version but ``keep``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        kept = {
            name: store.checkout(self.client)
            for name, store in (("store", worker.store), ("engine_store", worker.engine_store))
            if self.client in store
        }
        partial = self.dir / f".{version}.pt.partial"
        torch.save(kept, partial)
        partial.replace(self.dir / f"{version}.pt")
        for path in self.dir.glob("*.pt"):
            if path.stem not in {version, *keep}:
                path.unlink()
