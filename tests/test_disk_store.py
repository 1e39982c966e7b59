"""Client stores on disk (``federation.client_store: disk``): the same stores as in memory, read lazily, versioned
for the last checkpoint, and whole runs equal to in-memory ones."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny

from tapl.engine.client_store import ClientStateError, ClientStore
from tapl.engine.disk_store import ClientStoreFileError, DiskClientStore
from tapl.run_dir import RunDirectory

STORE = {
    "personal": {"encoder:text": {"lora.a": torch.arange(6.0).reshape(2, 3), "ids": torch.tensor([1, 2])}},
    "losses": {"sentiment": 0.25, "shapes": math.inf},
    "history": [1, "two", [3.0, None], True],
}


def assert_same(a: Any, b: Any) -> None:
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(b, dict):
        assert sorted(a) == sorted(b)
        for key in b:
            assert_same(a[key], b[key])
    elif isinstance(b, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_a_store_round_trips_through_its_file_and_checkouts_are_copies(tmp_path: Path) -> None:
    store = DiskClientStore(tmp_path)
    assert store.checkout(7) == {} and 7 not in store
    store.commit(7, STORE)
    assert list(store) == [7]
    work = store.checkout(7)
    assert_same(work, STORE)
    work["personal"]["encoder:text"]["lora.a"].add_(1)  # a visit changing its copy in place
    assert_same(store.checkout(7), STORE)
    assert [p.name for p in (tmp_path / "client-7").iterdir()] == ["000001.safetensors"]


def test_non_finite_tensors_are_refused_and_the_previous_version_kept(tmp_path: Path) -> None:
    store = DiskClientStore(tmp_path)
    store.commit(0, STORE)
    with pytest.raises(ClientStateError, match="personal/w"):
        store.commit(0, {"personal": {"w": torch.tensor([math.nan])}})
    assert_same(store.checkout(0), STORE)


def test_the_checkpointed_version_stays_until_a_newer_checkpoint(tmp_path: Path) -> None:
    store = DiskClientStore(tmp_path)
    store.commit(1, {"v": torch.tensor([1.0])})
    checkpoint = store.state_dict()  # holds version 1
    store.commit(1, {"v": torch.tensor([2.0])})
    store.commit(1, {"v": torch.tensor([3.0])})
    assert sorted(p.name for p in (tmp_path / "client-1").iterdir()) == ["000001.safetensors", "000003.safetensors"]
    resumed = DiskClientStore(tmp_path)
    resumed.load_state_dict(checkpoint)
    assert torch.equal(resumed.checkout(1)["v"], torch.tensor([1.0]))
    resumed.commit(1, {"v": torch.tensor([4.0])})  # the resumed run writes version 2 again, anew
    assert torch.equal(resumed.checkout(1)["v"], torch.tensor([4.0]))
    resumed.state_dict()
    resumed.commit(1, {"v": torch.tensor([5.0])})
    assert sorted(p.name for p in (tmp_path / "client-1").iterdir()) == ["000002.safetensors", "000003.safetensors"]


def test_a_missing_file_and_a_mismatched_checkpoint_fail_with_what_to_do(tmp_path: Path) -> None:
    store = DiskClientStore(tmp_path)
    store.commit(4, STORE)
    checkpoint = store.state_dict()
    (tmp_path / "client-4" / "000001.safetensors").unlink()
    with pytest.raises(ClientStoreFileError, match="client 4's state"):
        store.checkout(4)
    with pytest.raises(ClientStateError, match=r"federation\.client_store disk"):
        ClientStore().load_state_dict(checkpoint)
    memory = ClientStore()
    memory.commit(5, STORE)
    converted = DiskClientStore(tmp_path / "converted")
    converted.load_state_dict(memory.state_dict())
    assert_same(converted.checkout(5), STORE)


def test_a_run_with_stores_on_disk_equals_one_in_memory_and_resumes_exactly(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TAP keeps a personal model and loss histories per client, and the engine its fine-tuned "+FT" models."""
    algorithm = "TAP"
    monkeypatch.setattr(sys, "argv", ["tapl"])
    runs = {}
    for kind in ("memory", "disk"):
        runs[kind] = fit_tiny(tmp_path / kind, assets, "--algorithm", algorithm, rounds=3, client_store=kind)
    # Resumed from round 2: round 3 reads the personal states that round 2's checkpoint holds.
    resumed = tmp_path / "resumed"
    fit_tiny(resumed, assets, "--algorithm", algorithm, rounds=2, client_store="disk")
    fit_tiny(resumed, assets, "--algorithm", algorithm, "--ckpt_path", "last", rounds=3, client_store="disk")
    assert (runs["disk"] / "client_stores" / "store").is_dir()
    final = {}
    for name, run_dir in (*runs.items(), ("resumed", resumed)):
        run = RunDirectory(run_dir)
        state, payload = run.load_checkpoint(run.resolve_checkpoint("last"))
        stores = payload["client_store"]
        if name != "memory":
            disk = DiskClientStore(run_dir / "client_stores" / "store")
            disk.load_state_dict(stores)
            stores = {str(c): disk.checkout(c) for c in disk}
        final[name] = (state, stores)
    assert final["memory"][1]  # the algorithm keeps personal state: the comparison covers it
    assert_same(final["disk"], final["memory"])
    assert_same(final["resumed"], final["memory"])
