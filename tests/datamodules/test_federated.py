"""FederatedDataModule: splits, partition over clients, validation of the data, collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tapl.datamodules import ClientGroup, Dirichlet, FederatedDataModule, MultiTaskCollator, TaskData
from tapl.datamodules.federated import SPLITS
from tapl.errors import DataError


def write_parquet(path: Path, rows: int = 200, num_classes: int = 4) -> Path:
    labels = np.arange(rows) % num_classes
    pd.DataFrame({"text": [f"row {i}" for i in range(rows)], "label": labels, "row": np.arange(rows)}).to_parquet(path)
    return path


def text_task(path: Path, **overrides: object) -> TaskData:
    settings = {"name": "t", "inputs": {"text": "text"}, "target": "label", "num_classes": 4, "dataset": "parquet"}
    return TaskData(**{**settings, "data_files": str(path), **overrides})


def test_splits_and_clients_never_share_a_row(tmp_path: Path) -> None:
    task = TaskData(
        name="t",
        inputs={"text": "text"},
        target="row",
        num_classes=200,
        dataset="parquet",
        data_files=str(write_parquet(tmp_path / "d.parquet")),
    )
    data = FederatedDataModule([task], [ClientGroup(["t"], count=3)])
    data.setup()
    seen: list[int] = []
    for client in range(3):
        for split in SPLITS:
            seen += [int(data.dataset(client, split)[i]["target"]) for i in range(data.num_samples(client, split))]
    assert sorted(seen) == list(range(200))
    assert sum(data.num_samples(c, "test") for c in range(3)) == 30  # test_fraction 0.15 of 200


def test_each_client_has_the_same_label_mix_in_train_and_test(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", rows=2000)
    data = FederatedDataModule([text_task(path)], [ClientGroup(["t"], count=4)], partitioner=Dirichlet(alpha=0.3))
    data.setup()
    for client in range(4):
        mixes = []
        for split in ("train", "test"):
            dataset = data.dataset(client, split)
            labels = np.array([dataset[i]["target"] for i in range(len(dataset))])
            mixes.append(np.bincount(labels, minlength=4) / len(labels))
        assert np.abs(mixes[0] - mixes[1]).max() < 0.1


def test_partition_is_seeded_by_the_data_seed(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet")

    def targets(seed: int) -> list[int]:
        data = FederatedDataModule([text_task(path)], [ClientGroup(["t"], count=2)], Dirichlet(1.0), seed=seed)
        data.setup()
        dataset = data.dataset(0, "train")
        return [dataset[i]["inputs"]["text"] for i in range(len(dataset))]

    assert targets(0) == targets(0)
    assert targets(0) != targets(1)


def test_missing_column_is_named(tmp_path: Path) -> None:
    task = text_task(write_parquet(tmp_path / "d.parquet"), inputs={"text": "sentence"})
    data = FederatedDataModule([task], [ClientGroup(["t"])])
    with pytest.raises(ValueError, match=r"Task 't'.*no column\(s\) \['sentence'\]"):
        data.setup()


def test_label_outside_the_classes_is_named(tmp_path: Path) -> None:
    task = text_task(write_parquet(tmp_path / "d.parquet", num_classes=5), num_classes=4)
    data = FederatedDataModule([task], [ClientGroup(["t"])])
    where = r"Task 't' \(\w+ split, before the partition\): row \d+ of 'parquet' split 'train', column 'label',"
    with pytest.raises(ValueError, match=where + " holds label 4"):
        data.setup()


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    data = FederatedDataModule([text_task(tmp_path / "nope.parquet")], [ClientGroup(["t"])])
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        data.setup()


def test_client_left_without_rows_is_named(tmp_path: Path) -> None:
    task = text_task(write_parquet(tmp_path / "d.parquet", rows=20), test_fraction=0.1)
    data = FederatedDataModule([task], [ClientGroup(["t"], count=3)])
    with pytest.raises(ValueError, match=r"Client \d has no test rows of task 't'"):
        data.setup()


def test_unknown_task_and_duplicate_names_are_refused(tmp_path: Path) -> None:
    task = text_task(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"unknown tasks \['other'\]"):
        FederatedDataModule([task], [ClientGroup(["other"])])
    with pytest.raises(ValueError, match=r"task names \['t'\] are declared more than once"):
        FederatedDataModule([task, task], [ClientGroup(["t"])])


def test_max_rows_keeps_a_seeded_subset(tmp_path: Path) -> None:
    task = text_task(write_parquet(tmp_path / "d.parquet"), max_rows=100)
    data = FederatedDataModule([task], [ClientGroup(["t"], count=2)])
    data.setup()
    assert sum(data.num_samples(c, s) for c in range(2) for s in SPLITS) == 100


def test_collator_groups_a_batch_by_task() -> None:
    class Lengths:
        def __call__(self, values):
            return {"length": torch.tensor([len(v) for v in values])}

    from tapl.tasks import Task

    tasks = {
        "a": Task(name="a", type="classification", modalities=("text",), num_classes=2),
        "b": Task(name="b", type="classification", modalities=("text",), num_classes=3),
    }
    collate = MultiTaskCollator(tasks, {"text": Lengths()})
    samples = [
        {"task": "b", "inputs": {"text": "xyz"}, "target": 2},
        {"task": "a", "inputs": {"text": "x"}, "target": 1},
        {"task": "b", "inputs": {"text": "xy"}, "target": 0},
    ]
    batch = collate(samples)
    assert list(batch) == ["a", "b"]
    assert batch["b"]["inputs"]["text"]["length"].tolist() == [3, 2]
    assert batch["b"]["targets"].tolist() == [2, 0]
    assert batch["a"]["targets"].dtype == torch.long


def test_pattern_groups_share_a_task_only_within_their_group(tmp_path: Path) -> None:
    from tapl.datamodules import Grouped

    task = TaskData(
        name="t",
        inputs={"text": "text"},
        target="label",
        num_classes=4,
        dataset="parquet",
        data_files=str(write_parquet(tmp_path / "d.parquet", rows=600)),
    )
    clients = [ClientGroup(["t"], count=2, group=0), ClientGroup(["t"], count=1, group=1), ClientGroup(["t"], group=2)]
    data = FederatedDataModule([task], clients, partitioner=Grouped(num_groups=3))
    data.setup()
    train_rows = sum(data.num_samples(c, "train") for c in range(4))
    per_group = [
        data.num_samples(0, "train") + data.num_samples(1, "train"),
        data.num_samples(2, "train"),
        data.num_samples(3, "train"),
    ]
    assert all(abs(n - train_rows / 3) <= 4 for n in per_group)
    assert abs(data.num_samples(0, "train") - data.num_samples(1, "train")) <= 1


def test_unreadable_image_is_named_before_training(tmp_path: Path) -> None:
    from tapl.models.encoders import ImagePreprocessor

    images = [[0.5] * 64 for _ in range(40)]
    images[17] = [0.5] * 63
    pd.DataFrame({"pixels": images, "label": np.arange(40) % 2}).to_parquet(tmp_path / "img.parquet")
    task = TaskData(
        name="img",
        inputs={"image": "pixels"},
        target="label",
        num_classes=2,
        dataset="parquet",
        data_files=str(tmp_path / "img.parquet"),
    )
    data = FederatedDataModule([task], [ClientGroup(["img"], count=2)])
    data.setup()
    with pytest.raises(ValueError, match=r"Task 'img' \(client \d, \w+ split\): row 17 of 'parquet'.*'pixels'"):
        data.check_values({"image": ImagePreprocessor(image_size=8, channels=1)})


def test_truncated_texts_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tapl.models.encoders import TextPreprocessor

    class Words:
        def __call__(self, texts, truncation=False, **kwargs):
            return {"input_ids": [t.split() for t in texts]}

    texts = ["a b c"] * 30 + ["a b c d e f g"] * 10
    pd.DataFrame({"text": texts, "label": np.arange(40) % 2}).to_parquet(tmp_path / "t.parquet")
    data = FederatedDataModule([text_task(tmp_path / "t.parquet", num_classes=2)], [ClientGroup(["t"])])
    data.setup()
    with caplog.at_level("WARNING"):
        data.check_values({"text": TextPreprocessor(Words(), max_length=5)})
    assert "10 value(s) of column 'text' exceed" in caplog.text


def write_qa_parquet(path: Path, rows: int = 60) -> Path:
    pd.DataFrame(
        {
            "question": [f"q{i}" for i in range(rows)],
            "choices": [[f"a{i}", f"b{i}", f"c{i}", f"d{i}"] for i in range(rows)],
            "answer": np.arange(rows) % 4,
            "words": [["dog", "ball", f"w{i}"] for i in range(rows)],
        }
    ).to_parquet(path)
    return path


def test_input_and_target_templates_are_formatted_from_the_row(tmp_path: Path) -> None:
    path = write_qa_parquet(tmp_path / "qa.parquet")
    mc = TaskData(
        name="mc",
        inputs={"text": "{question} A) {choices[0]} B) {choices[1]} all: {choices}"},
        target="answer",
        num_classes=4,
        dataset="parquet",
        data_files=str(path),
    )
    gen = TaskData(
        name="gen",
        type="text_generation",
        inputs={"text": "Write a sentence with: {words}"},
        target_template="{question}: {choices[3]}",
        dataset="parquet",
        data_files=str(path),
    )
    data = FederatedDataModule([mc, gen], [ClientGroup(["mc", "gen"])])
    data.setup()
    dataset = data.dataset(0, "train")
    samples = {dataset[i]["task"]: dataset[i] for i in range(len(dataset))}
    i = int(samples["mc"]["inputs"]["text"].split()[0][1:])
    assert samples["mc"]["inputs"]["text"] == f"q{i} A) a{i} B) b{i} all: a{i}, b{i}, c{i}, d{i}"
    assert samples["mc"]["target"] == i % 4
    j = int(samples["gen"]["target"].split(":")[0][1:])
    assert samples["gen"]["inputs"]["text"] == f"Write a sentence with: dog, ball, w{j}"
    assert samples["gen"]["target"] == f"q{j}: d{j}"
    assert gen.to_task().modalities == ("text",)


def test_plain_columns_still_work_beside_templates(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet")
    data = FederatedDataModule([text_task(path)], [ClientGroup(["t"])])
    data.setup()
    sample = data.dataset(0, "train")[0]
    assert sample["inputs"]["text"].startswith("row ") and isinstance(sample["target"], (int, np.integer))


def test_a_template_naming_a_missing_column_is_named(tmp_path: Path) -> None:
    path = write_qa_parquet(tmp_path / "qa.parquet")
    task = TaskData(
        name="mc",
        inputs={"text": "{question} {options}"},
        target="answer",
        num_classes=4,
        dataset="parquet",
        data_files=str(path),
    )
    with pytest.raises(ValueError, match=r"Task 'mc': template '\{question\} \{options\}'.*\['options'\]"):
        FederatedDataModule([task], [ClientGroup(["mc"])]).setup()
    gen = TaskData(
        name="g",
        type="text_generation",
        inputs={"text": "question"},
        target_template="{concepts}",
        dataset="parquet",
        data_files=str(path),
    )
    with pytest.raises(ValueError, match=r"Task 'g': template '\{concepts\}'.*\['concepts'\]"):
        FederatedDataModule([gen], [ClientGroup(["g"])]).setup()


def test_template_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="needs type text_generation"):
        TaskData(name="c", inputs={"text": "q"}, target_template="{a}", num_classes=2, dataset="parquet")
    with pytest.raises(ValueError, match="positional field"):
        TaskData(name="c", inputs={"text": "{} x"}, target="a", num_classes=2, dataset="parquet")
    with pytest.raises(ValueError, match="target column"):
        TaskData(name="c", inputs={"text": "q"}, dataset="parquet")


def test_a_template_index_may_name_a_column() -> None:
    from tapl.datamodules.federated import render, template_fields

    row = {"choices": ["red", "green", "blue"], "answer": 2}
    assert render("{choices[answer]}", row) == "blue"
    assert render("{choices[0]} or {choices}", row) == "red or red, green, blue"
    assert template_fields("{choices[answer]}") == ["choices", "answer"]


def write_domains(path: Path, sizes: dict[str, int], num_classes: int = 3) -> Path:
    domains = [d for d, n in sizes.items() for _ in range(n)]
    rows = len(domains)
    pd.DataFrame(
        {"text": [f"{d} {i}" for i, d in enumerate(domains)], "label": np.arange(rows) % num_classes, "domain": domains}
    ).to_parquet(path)
    return path


def domains_of(data: FederatedDataModule, client: int, split: str) -> set[str]:
    dataset = data.dataset(client, split)
    return {dataset[i]["inputs"]["text"].split()[0] for i in range(len(dataset))}


def test_a_domain_column_gives_each_client_one_domain_in_proportion_to_its_rows(tmp_path: Path) -> None:
    path = write_domains(tmp_path / "d.parquet", {"news": 600, "movies": 2100, "tweets": 300})
    task = text_task(path, num_classes=3, domain_column="domain")
    data = FederatedDataModule([task], [ClientGroup(["t"], count=10)], partitioner=Dirichlet(0.5, 5))
    data.setup()
    owner = {}
    for client in range(10):
        (domain,) = domains_of(data, client, "train")
        assert domains_of(data, client, "test") <= {domain} and domains_of(data, client, "val") <= {domain}
        owner[client] = domain
    # One client each, then the other 7 by training rows (7:2:1, i.e. quotas 4.9, 1.4, 0.7): movies 1 + 4 + 1 and
    # tweets 1 + 0 + 1 by the largest remainders, news 1 + 1; domains in sorted order, each a block of clients.
    assert [owner[c] for c in range(10)] == ["movies"] * 6 + ["news"] * 2 + ["tweets"] * 2
    seen = sum(data.num_samples(c, s) for c in range(10) for s in SPLITS)
    assert seen == 3000  # every row has exactly one owner


def test_domains_are_split_by_the_partitioner_within_each_domain(tmp_path: Path) -> None:
    path = write_domains(tmp_path / "d.parquet", {"a": 900, "b": 900})
    task = text_task(path, num_classes=3, domain_column="domain")
    data = FederatedDataModule([task], [ClientGroup(["t"], count=4)], partitioner=Dirichlet(0.1, 5), seed=3)
    data.setup()
    mixes = []
    for client in range(4):
        dataset = data.dataset(client, "train")
        mixes.append(np.bincount([dataset[i]["target"] for i in range(len(dataset))], minlength=3) / len(dataset))
    # Dirichlet(0.1) skews labels inside a domain; an IID split of a domain would leave each mix near 1/3.
    assert max(np.abs(m - 1 / 3).max() for m in mixes) > 0.2


def test_domain_errors_name_the_column_and_the_fix(tmp_path: Path) -> None:
    path = write_domains(tmp_path / "d.parquet", {"a": 100, "b": 100, "c": 100})
    few = FederatedDataModule([text_task(path, domain_column="domain")], [ClientGroup(["t"], count=2)])
    with pytest.raises(DataError, match=r"2 client\(s\) cannot cover the 3 domains of column 'domain'"):
        few.setup()
    absent = FederatedDataModule([text_task(path, domain_column="source")], [ClientGroup(["t"], count=3)])
    with pytest.raises(ValueError, match=r"domain_column 'source' is not a column"):
        absent.setup()
    frame = pd.read_parquet(path)
    frame.loc[7, "domain"] = None
    frame.to_parquet(path)
    null = FederatedDataModule([text_task(path, domain_column="domain")], [ClientGroup(["t"], count=3)])
    with pytest.raises(DataError, match=r"column 'domain', is null: every row needs a domain"):
        null.setup()
