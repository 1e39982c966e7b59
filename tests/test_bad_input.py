"""The bad-input catalogue: every way a user, a file system or a plugin can hand ``tapl`` something wrong.

Each case runs the command as a user would and asserts three things: the exit status, the one-line message
(``tapl: error: ...`` naming what is wrong, without a traceback or the usage banner), and that the run directory
is left usable: a fresh one is not created, an existing one is unchanged, or ``--ckpt_path`` resumes it.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import command_env, read_records, snapshot, tapl_command, tiny_config, write_config

import tapl.run_dir
from tapl.algorithms import ClientContext, ClientUpdate, Failure, FedAvg
from tapl.cli import main
from tapl.components import ComponentState, weighted_average
from tapl.run_dir import RunDirectory

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# -- helpers ----------------------------------------------------------------------------------------------


def run_tapl(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``tapl`` in-process; return its exit status and the last line it wrote to stderr."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def fit(config: dict[str, Any], path: Path, *args: str) -> list[str]:
    """The arguments of ``tapl fit`` with ``config`` written to ``path``."""
    return ["fit", "--config", str(write_config(path, config)), *args]


def expect_error(code: int, line: int | str, status: int, *parts: str) -> None:
    assert code == status, line
    assert str(line).startswith("tapl: error: ")
    for part in parts:
        assert part in str(line), (part, line)


def no_temporary_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return tmp_path / "fresh"


# -- arguments and configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--algorithm", "NoSuch"], ["unknown algorithm 'NoSuch'", "FedAvg", "PerFedAvg", "TAP"]),
        (["--algorithm", "nosuchmodule.Method"], ["unknown algorithm 'nosuchmodule.Method'", "No module"]),
        (["--algorithm", "tapl.components.ComponentMismatchError"], ["not correspond to a subclass of Algorithm"]),
        (["--algorithm.weighting", "nope"], ["weighting", "nope"]),
        (["--federation.rounds", "many"], ["federation.rounds", "many"]),
        (["--federation.nosuch", "1"], ["unrecognized arguments", "--federation.nosuch"]),
    ],
    ids=["unknown-name", "missing-module", "not-an-algorithm", "bad-option-value", "not-an-int", "unknown-flag"],
)
def test_argument_errors_are_one_line_with_status_2(
    assets: dict[str, Path], fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], parts
) -> None:
    code, line = run_tapl(fit(tiny_config(assets, fresh), tmp_path / "c.yaml", *args), capsys)
    expect_error(code, line, 2, *parts, "tapl fit --help")
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--seeds", "0,x"], ["--seeds must be comma-separated integers, got '0,x'"]),
        ([], ["the following arguments are required: --algorithms"]),
        (["--algorithms", "FedAvg", "--baseline", "TAP"], ["--baseline TAP: TAP is not one of --algorithms"]),
    ],
    ids=["bad-seeds", "no-algorithms", "bad-baseline"],
)
def test_compare_argument_errors_are_one_line_with_status_2(assets, tmp_path: Path, capsys, args, parts) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config(assets, tmp_path / "unused"))
    algorithms = [] if "--algorithms" in args or not args else ["--algorithms", "FedAvg"]
    code, line = run_tapl(
        ["compare", "--config", str(config), "--run_dir", str(tmp_path / "out"), *algorithms, *args], capsys
    )
    expect_error(code, line, 2, *parts, "tapl compare --help")
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run_tapl(["fit", "--config", str(tmp_path / "nope.yaml")], capsys)
    expect_error(code, line, 2, "does not exist", "nope.yaml")


def test_config_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("model: [\n")
    code, line = run_tapl(["fit", "--config", str(tmp_path / "bad.yaml")], capsys)
    expect_error(code, line, 2, "Problems parsing config", "line 2")


@pytest.mark.parametrize(
    ("change", "parts"),
    [
        (lambda c: c["federation"].update(rounds=0), ["federation.rounds must be >= 1"]),
        (lambda c: c["federation"].update(clients_per_round=1.5), ["clients_per_round", "1.5"]),
        (lambda c: c["federation"].update(holdout_clients=[9]), ["holdout_clients", "[9]"]),
        (lambda c: c["data"]["clients"].append({"tasks": ["poetry"]}), ["unknown tasks ['poetry']"]),
    ],
    ids=["zero-rounds", "fraction-above-1", "unknown-holdout", "unknown-task"],
)
def test_invalid_settings_are_named(
    assets: dict[str, Path], fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change, parts
) -> None:
    config = tiny_config(assets, fresh)
    change(config)
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, *parts)
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("{tmp}/no-such-model", ["model directory", "no-such-model", "does not exist"]),
        ("someone/no-such-model", ["'someone/no-such-model' is not a local directory", "Hugging Face hub"]),
    ],
    ids=["missing-directory", "unknown-hub-name-offline"],
)
def test_a_model_that_cannot_be_found(
    assets: dict[str, Path], fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, parts
) -> None:
    config = tiny_config(assets, fresh)
    config["model"]["encoders"]["text"]["init_args"]["name_or_path"] = name.format(tmp=tmp_path)
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, *parts)
    assert not fresh.exists()


# -- data --------------------------------------------------------------------------------------------------


def text_rows(assets: dict[str, Path]) -> pd.DataFrame:
    return pd.read_parquet(assets["text"])


def image_rows(assets: dict[str, Path]) -> pd.DataFrame:
    return pd.read_parquet(assets["image"])


def with_text_file(config: dict[str, Any], path: Path) -> None:
    config["data"]["tasks"][0]["data_files"] = str(path)


def with_image_file(config: dict[str, Any], path: Path) -> None:
    config["data"]["tasks"][1]["data_files"] = str(path)


def text_with(assets: dict[str, Path], path: Path, column: str, row: int, value: Any) -> Path:
    frame = text_rows(assets)
    frame[column] = frame[column].astype(object)
    frame.at[row, column] = value
    frame.to_parquet(path)
    return path


def pixels_with(assets: dict[str, Path], path: Path, row: int, value: float) -> Path:
    frame = image_rows(assets)
    images = [list(pixels) for pixels in frame["pixels"]]
    images[row][5] = value
    frame["pixels"] = images
    frame.to_parquet(path)
    return path


def png_images(path: Path, broken_row: int) -> Path:
    """A parquet of 8x8 PNG images in a ``datasets`` Image column, the bytes of one cut short."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for row in range(80):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        images.append({"bytes": data[:30] if row == broken_row else data, "path": None})
    features = datasets.Features({"pixels": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"pixels": images, "label": [r % 2 for r in range(80)]}, features=features).to_parquet(
        str(path)
    )
    return path


WHERE = (
    r"Task '{task}' \(client \d+, (train|val|test) split\): row {row} of 'parquet' split 'train', column '{column}',"
)


def _no_file(path: Path, assets: dict[str, Path]) -> None:
    pass


def _notes(path: Path, assets: dict[str, Path]) -> None:
    path.write_text("these are notes, not a table\n")


def _no_rows(path: Path, assets: dict[str, Path]) -> None:
    text_rows(assets).iloc[:0].to_parquet(path)


@pytest.mark.parametrize(
    ("make", "parts"),
    [
        (_no_file, ["not found"]),
        (_notes, ["could not load", "Parquet magic bytes not found"]),
        (_no_rows, ["hold no rows"]),
    ],
    ids=["missing", "not-parquet", "no-rows"],
)
def test_an_unusable_data_file_is_one_line(assets, fresh: Path, tmp_path: Path, capsys, make, parts) -> None:
    make(tmp_path / "data.parquet", assets)
    config = tiny_config(assets, fresh)
    with_text_file(config, tmp_path / "data.parquet")
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "Task 'sentiment'", str(tmp_path / "data.parquet"), *parts)
    assert not fresh.exists()


def test_a_column_that_is_not_there(assets: dict[str, Path], fresh: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(assets, fresh)
    config["data"]["tasks"][0]["inputs"] = {"text": "review"}
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "'sentiment'", "no column(s) ['review']", "'sentence'")
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("value", "what"), [(None, "null"), ("   ", "an empty text"), ("", "an empty text")], ids=["null", "blank", "empty"]
)
def test_missing_texts_are_refused(assets, fresh: Path, tmp_path: Path, capsys, value: Any, what: str) -> None:
    config = tiny_config(assets, fresh)
    with_text_file(config, text_with(assets, tmp_path / "t.parquet", "sentence", 17, value))
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    assert re.search(WHERE.format(task="sentiment", row=17, column="sentence") + f" is {what}", line), line
    assert "drop_missing" in line
    assert not fresh.exists()


def test_a_missing_text_generation_target_is_refused(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(assets, fresh)
    task = config["data"]["tasks"][0]
    task.update(type="text_generation", target="answer", target_length=6)
    del task["num_classes"]
    with_text_file(config, text_with(assets, tmp_path / "t.parquet", "answer", 33, None))
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    assert re.search(WHERE.format(task="sentiment", row=33, column="answer") + " is null", line), line
    assert not fresh.exists()


def test_a_missing_class_label_is_refused(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    frame = text_rows(assets)
    frame["label"] = frame["label"].astype("Int64")
    frame.at[40, "label"] = pd.NA
    frame.to_parquet(tmp_path / "t.parquet")
    config = tiny_config(assets, fresh)
    with_text_file(config, tmp_path / "t.parquet")
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    where = r"Task 'sentiment' \((train|val|test) split, before the partition\): row 40 of 'parquet' split 'train'"
    assert re.search(where + ", column 'label', is null", line), line
    assert not fresh.exists()


def test_a_label_outside_the_classes_is_refused(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(assets, fresh)
    with_text_file(config, text_with(assets, tmp_path / "t.parquet", "label", 9, 5))
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    where = r"Task 'sentiment' \((train|val|test) split, before the partition\): row 9 of 'parquet' split 'train'"
    assert re.search(where + r", column 'label', holds label 5 outside \[0, 2\); 1 such rows", line), line
    assert not fresh.exists()


def test_missing_rows_are_dropped_and_counted_when_asked(assets, fresh: Path, tmp_path: Path, capsys, caplog) -> None:
    frame = text_rows(assets)
    frame["sentence"] = frame["sentence"].astype(object)
    frame.loc[[3, 50, 51], "sentence"] = [None, "", " "]
    frame.to_parquet(tmp_path / "t.parquet")
    config = tiny_config(assets, fresh)
    with_text_file(config, tmp_path / "t.parquet")
    config["data"]["tasks"][0]["drop_missing"] = True
    with caplog.at_level("WARNING"):
        code, _ = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 0
    assert "'sentiment': dropped 3 of 240 rows with a missing value ('sentence': 3)" in caplog.text
    assert (fresh / "results.json").is_file()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_pixels_are_refused(assets, fresh: Path, tmp_path: Path, capsys, value: float) -> None:
    config = tiny_config(assets, fresh)
    with_image_file(config, pixels_with(assets, tmp_path / "i.parquet", 21, value))
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    where = WHERE.format(task="shapes", row=21, column="pixels")
    assert re.search(where + r" is not a readable image: ValueError: image has 1 non-finite pixel value", line), line
    assert not fresh.exists()


def test_a_truncated_image_file_is_named(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(assets, fresh)
    with_image_file(config, png_images(tmp_path / "png.parquet", broken_row=11))
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 1
    assert re.search(WHERE.format(task="shapes", row=11, column="pixels") + " cannot be read: ", line), line
    assert not fresh.exists()


# -- checkpoints -------------------------------------------------------------------------------------------


def resume_args(assets: dict[str, Path], existing_run: Path, tmp_path: Path, *args: str, rounds: int = 3) -> list[str]:
    return fit(tiny_config(assets, existing_run, rounds=rounds), tmp_path / "resume.yaml", "--ckpt_path", "last", *args)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "nan":  # the last 4 bytes of a float32 tensor become NaN: same size, still parses
        path.write_bytes(data[:-4] + np.array([np.nan], dtype=np.float32).tobytes())


@pytest.mark.parametrize(
    ("file", "how", "parts"),
    [
        ("round-000002/state.pt", "truncate", ["round-000002/state.pt is damaged"]),
        ("round-000002/server.safetensors", "nan", ["round-000002/server.safetensors is damaged", "SHA-256"]),
        ("round-000002/checksums.json", "truncate", ["round-000002/checksums.json is damaged"]),
    ],
    ids=["truncated-state", "nan-overwritten-tensors", "damaged-checksums"],
)
def test_a_damaged_round_checkpoint_is_named_and_the_previous_one_resumes(
    assets, existing_run: Path, tmp_path: Path, capsys, file: str, how: str, parts
) -> None:
    damage(existing_run / "checkpoints" / file, how)
    before = snapshot(existing_run)
    code, line = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)
    earlier = existing_run / "checkpoints" / "round-000001"
    expect_error(code, line, 1, *parts, f"--ckpt_path {earlier}")
    assert snapshot(existing_run) == before
    code, _ = run_tapl(
        fit(tiny_config(assets, existing_run, rounds=3), tmp_path / "r.yaml", "--ckpt_path", str(earlier)), capsys
    )
    assert code == 0
    assert [r["round"] for r in read_records(existing_run)] == [1, 2, 3]


@pytest.mark.parametrize("command", ["fit", "test"])
def test_an_empty_final_state_is_named(assets, existing_run: Path, tmp_path: Path, capsys, command: str) -> None:
    damage(existing_run / "checkpoints" / "final" / "state.pt", "empty")
    before = snapshot(existing_run)
    config = write_config(tmp_path / "c.yaml", tiny_config(assets, existing_run))
    code, line = run_tapl([command, "--config", str(config), "--ckpt_path", "last"], capsys)
    expect_error(code, line, 1, "final/state.pt is damaged", "--ckpt_path", "round-000002")
    assert snapshot(existing_run) == before


def test_an_unreadable_checkpoint_without_checksums(assets, existing_run: Path, tmp_path: Path, capsys) -> None:
    # A checkpoint of a version that wrote no checksums: the loader's error is reported instead.
    (existing_run / "checkpoints" / "round-000002" / "checksums.json").unlink()
    damage(existing_run / "checkpoints" / "round-000002" / "state.pt", "truncate")
    code, line = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)
    expect_error(code, line, 1, "round-000002/state.pt cannot be read", "round-000001")


def test_a_checkpoint_path_that_is_not_a_checkpoint(assets, existing_run: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(existing_run)
    code, line = run_tapl(
        fit(tiny_config(assets, existing_run), tmp_path / "c.yaml", "--ckpt_path", str(tmp_path)), capsys
    )
    expect_error(code, line, 1, "not a tapl checkpoint directory")
    assert snapshot(existing_run) == before


# -- resuming another existing_run ----------------------------------------------------------------------------------


def _other_data_file(config: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "copy.parquet"
    shutil.copy(config["data"]["tasks"][0]["data_files"], copy)
    config["data"]["tasks"][0]["data_files"] = str(copy)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c, _: c["data"].update(seed=7), "data.seed: checkpoint 0, now 7"),
        (lambda c, _: c["federation"].update(seed=3), "federation.seed: checkpoint 0, now 3"),
        (lambda c, _: c["data"].update(partitioner={"class_path": "tapl.datamodules.Dirichlet"}), "data.partitioner"),
        (_other_data_file, "data.tasks"),
        (lambda c, _: c.update(algorithm={"class_path": "FedAvg", "init_args": {"weighting": "uniform"}}), "weighting"),
        (lambda c, _: c["federation"].update(local_steps=5), "federation.local_steps: checkpoint 2, now 5"),
    ],
    ids=["data-seed", "federation-seed", "partitioner", "data-file", "algorithm-option", "local-steps"],
)
def test_resuming_with_other_settings_is_refused(
    assets, existing_run: Path, tmp_path: Path, capsys, change, key: str
) -> None:
    config = tiny_config(assets, existing_run, rounds=3)
    change(config, tmp_path)
    before = snapshot(existing_run)
    code, line = run_tapl(fit(config, tmp_path / "c.yaml", "--ckpt_path", "last"), capsys)
    expect_error(code, line, 1, "was written with other settings", key, "may change")
    assert snapshot(existing_run) == before


def test_resuming_may_change_rounds_progress_evaluation_and_checkpoints(
    assets, existing_run: Path, tmp_path: Path, capsys
):
    args = ["--federation.eval_every", "2", "--federation.checkpoint_every", "5", "--federation.progress", "true"]
    code, _ = run_tapl(resume_args(assets, existing_run, tmp_path, *args), capsys)
    assert code == 0
    assert [r["round"] for r in read_records(existing_run)] == [1, 2, 3]


# -- existing_run directories ---------------------------------------------------------------------------------------


def test_fit_into_a_directory_that_holds_a_run(assets, existing_run: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(existing_run)
    code, line = run_tapl(fit(tiny_config(assets, existing_run), tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "already holds a run", "--ckpt_path last")
    assert snapshot(existing_run) == before


def test_a_run_directory_in_use_is_refused_at_once_naming_the_holder(
    assets, existing_run: Path, tmp_path: Path, capsys
):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tapl.run_lock import RunLock\nwith RunLock({str(existing_run)!r}):\n print(1, flush=True)\n"
            " import time; time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        before = snapshot(existing_run)
        started = time.perf_counter()
        code, line = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)
        expect_error(code, line, 1, "in use by another tapl process", f"pid {holder.pid}")
        assert time.perf_counter() - started < 30
        assert snapshot(existing_run) == before
    finally:
        holder.kill()
        holder.wait()
    code, _ = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)  # a killed holder leaves no stale lock
    assert code == 0


def test_a_torn_last_record_is_dropped_on_resume(assets, existing_run: Path, tmp_path: Path, capsys) -> None:
    metrics = existing_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "sampled_clie')
    code, _ = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)
    assert code == 0
    assert [r["round"] for r in read_records(existing_run)] == [1, 2, 3]


def test_a_damaged_record_before_the_last_is_named(assets, existing_run: Path, tmp_path: Path, capsys) -> None:
    metrics = existing_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{broken", *lines]) + "\n")
    before = snapshot(existing_run)
    code, line = run_tapl(resume_args(assets, existing_run, tmp_path), capsys)
    expect_error(code, line, 1, "metrics.jsonl, line 1, is not a JSON record")
    assert snapshot(existing_run) == before


def fail_writes(monkeypatch: pytest.MonkeyPatch, target: str, match: str, error: int = errno.ENOSPC) -> None:
    """Make ``tapl.run_dir``'s ``torch.save`` of a path holding ``match``, or its ``os.replace`` onto a file named
    ``match``, fail with ``error`` (a full disk, a read-only file system)."""
    if target == "torch.save":
        real = torch.save

        def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            if match in str(path):
                Path(path).write_bytes(b"half")
                raise OSError(error, os.strerror(error), str(path))
            real(obj, path, *args, **kwargs)

        monkeypatch.setattr(tapl.run_dir.torch, "save", save)
    else:
        real_replace = os.replace

        def replace(source: Any, destination: Any) -> None:
            if Path(destination).name == match:
                raise OSError(error, os.strerror(error), str(destination))
            real_replace(source, destination)

        monkeypatch.setattr(tapl.run_dir.os, "replace", replace)


@pytest.mark.parametrize(
    ("target", "match", "error", "resumes_from"),
    [
        ("torch.save", "round-000002", errno.ENOSPC, 1),
        ("torch.save", "final", errno.ENOSPC, 2),
        ("os.replace", "results.json", errno.EROFS, 2),
    ],
    ids=["disk-full-round-checkpoint", "disk-full-final-checkpoint", "read-only-results"],
)
def test_a_failed_write_is_one_line_leaves_no_temporary_files_and_resumes(
    assets, fresh: Path, tmp_path: Path, capsys, monkeypatch, target: str, match: str, error: int, resumes_from: int
) -> None:
    config = tiny_config(assets, fresh)
    with monkeypatch.context() as patch:
        fail_writes(patch, target, match, error)
        code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, os.strerror(error))
    assert no_temporary_files(fresh)
    assert RunDirectory(fresh).round_checkpoints()[-1].name == f"round-{resumes_from:06d}"
    code, _ = run_tapl(fit(config, tmp_path / "c.yaml", "--ckpt_path", "last"), capsys)
    assert code == 0
    assert [r["round"] for r in read_records(fresh)] == [1, 2]
    assert sorted(r["client"] for r in read_records(fresh, "post_federation.jsonl")) == [0, 1, 2, 3]


def test_a_record_torn_by_a_full_disk_is_dropped_on_resume(assets, fresh, tmp_path: Path, capsys, monkeypatch) -> None:
    real = RunDirectory.append_metrics

    def append(self: RunDirectory, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        if name == "metrics.jsonl" and record["round"] == 2:
            with (self.root / name).open("a") as f:
                f.write('{"round": 2, "sam')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / name))
        real(self, record, name)

    config = tiny_config(assets, fresh)
    with monkeypatch.context() as patch:
        patch.setattr(RunDirectory, "append_metrics", append)
        code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "No space left on device")
    code, _ = run_tapl(fit(config, tmp_path / "c.yaml", "--ckpt_path", "last"), capsys)
    assert code == 0
    assert [r["round"] for r in read_records(fresh)] == [1, 2]


# -- plugins -----------------------------------------------------------------------------------------------

POISON = {"on": True}


class PoisonedAggregate(FedAvg):
    """FedAvg whose aggregate of round 2 holds a NaN while ``POISON["on"]`` (a bug fixed between runs)."""

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        state = super().aggregate(round, global_state, results, failures)
        if round == 2 and POISON["on"]:
            head = {name: tensor.clone() for name, tensor in state["head[sentiment]"].items()}
            next(iter(head.values())).view(-1)[0] = math.nan
            state = {**state, "head[sentiment]": head}
        return state


class NanWeight(FedAvg):
    """FedAvg that weights one client by NaN."""

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        weights = [math.nan] + [1.0] * (len(results) - 1)
        return weighted_average(global_state, [r.state for r in results], weights)


class NonFiniteMetrics(FedAvg):
    """FedAvg that reports non-finite round metrics."""

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        self.log("nan", math.nan)
        self.log("inf", math.inf)
        return super().aggregate(round, global_state, results, failures)


class FailingClients(FedAvg):
    """FedAvg whose clients in ``failing`` raise."""

    def __init__(self, failing: list[int]) -> None:
        super().__init__()
        self.failing = failing

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        if ctx.client.id in self.failing:
            raise RuntimeError(f"client {ctx.client.id} is broken")
        return super().client_update(ctx)


def with_plugin(config: dict[str, Any], name: str, **init_args: Any) -> dict[str, Any]:
    config["algorithm"] = {"class_path": f"{__name__}.{name}", "init_args": init_args}
    return config


@pytest.mark.parametrize("plugin", ["PoisonedAggregate", "NanWeight"])
def test_a_non_finite_aggregate_is_neither_logged_nor_checkpointed(assets, fresh, tmp_path: Path, capsys, plugin):
    config = with_plugin(tiny_config(assets, fresh), plugin)
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "aggregate() of", "non-finite values", "neither logged nor checkpointed")
    bad_round = 2 if plugin == "PoisonedAggregate" else 1
    assert [r["round"] for r in RunDirectory(fresh).read_metrics()] == list(range(1, bad_round))
    assert [p.name for p in RunDirectory(fresh).round_checkpoints()] == [f"round-{r:06d}" for r in range(1, bad_round)]
    if plugin == "PoisonedAggregate":  # once the plugin is fixed, the existing_run resumes
        POISON["on"] = False
        try:
            code, _ = run_tapl(fit(config, tmp_path / "c.yaml", "--ckpt_path", "last"), capsys)
        finally:
            POISON["on"] = True
        assert code == 0
        assert [r["round"] for r in read_records(fresh)] == [1, 2]


def test_records_are_strict_json(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    code, _ = run_tapl(fit(with_plugin(tiny_config(assets, fresh), "NonFiniteMetrics"), tmp_path / "c.yaml"), capsys)
    assert code == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    records = [json.loads(line, parse_constant=refuse) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [r["algorithm"] for r in records] == [{"nan": None, "inf": None}] * 2
    json.loads((fresh / "results.json").read_text(), parse_constant=refuse)


def test_a_failing_client_is_excluded_and_the_run_goes_on(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    config = with_plugin(tiny_config(assets, fresh, clients_per_round=4), "FailingClients", failing=[1])
    code, _ = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    assert code == 0
    assert [r["failed_clients"] for r in read_records(fresh)] == [{"1": "RuntimeError: client 1 is broken"}] * 2


def test_a_round_whose_every_client_fails(assets, fresh: Path, tmp_path: Path, capsys) -> None:
    config = with_plugin(tiny_config(assets, fresh), "FailingClients", failing=[0, 1, 2, 3])
    code, line = run_tapl(fit(config, tmp_path / "c.yaml"), capsys)
    expect_error(code, line, 1, "Round 1: every sampled client failed", "is broken")
    assert not RunDirectory(fresh).holds_run()  # a corrected existing_run can start here


# -- the command -------------------------------------------------------------------------------------------


def test_a_second_fit_into_a_running_run_is_refused_and_ctrl_c_says_how_to_resume(assets, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(assets, run_dir, rounds=200))
    process = subprocess.Popen(
        [*tapl_command(), "fit", "--config", str(config)], env=command_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "round-000002").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    code, line = run_tapl(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    expect_error(code, line, 1, "in use by another tapl process", f"pid {process.pid}")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tapl: stopped (Ctrl-C)")
    assert f"--config {run_dir / 'config.yaml'} --ckpt_path last" in last
    assert no_temporary_files(run_dir) and not (run_dir / ".lock").exists()
    checkpoints = RunDirectory(run_dir).round_checkpoints()
    RunDirectory(run_dir).load_checkpoint(checkpoints[-1])  # the last checkpoint is whole


def test_tapl_debug_shows_the_traceback(assets, fresh: Path, tmp_path: Path) -> None:
    config = tiny_config(assets, fresh)
    config["federation"]["rounds"] = 0
    done = subprocess.run(
        [*tapl_command(), "fit", "--config", str(write_config(tmp_path / "c.yaml", config))],
        env=command_env(TAPL_DEBUG="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "tapl: error: federation.rounds must be >= 1, got 0"
