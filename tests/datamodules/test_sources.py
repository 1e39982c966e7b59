"""Tests for tapl.datamodules.sources, offline: no test touches the network."""

from __future__ import annotations

import io
import logging
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tapl.datamodules import sources


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _build_sdist(path: Path, files: dict[str, str]) -> Path:
    """Write a tarball laid out like the vaderSentiment 3.3.2 sdist, with the given ground-truth files."""
    nested = io.BytesIO()
    with tarfile.open(fileobj=nested, mode="w:gz") as inner:
        for name, text in files.items():
            _add_bytes(inner, f"hutto_ICWSM_2014/{name}", text.replace("\n", "\r\n").encode("utf-8"))
        _add_bytes(inner, "hutto_ICWSM_2014/_README_.txt", b"not data\r\n")
    with tarfile.open(path, mode="w:gz") as outer:
        _add_bytes(outer, "vaderSentiment-3.3.2/setup.py", b"")
        _add_bytes(outer, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", nested.getvalue())
    return path


_GROUND_TRUTH = {
    "tweets_GroundTruth.txt": "1\t2.7\t  I love this!  \n2\t-0.5\tmeh, bad\n3\t0.49\tit is a day\n",
    "movieReviewSnippets_GroundTruth.txt": "1\t-3.2\tThe worst film, naïvely made\n2\t0.5\tA café scene\n",
    "amazonReviewSnippets_GroundTruth.txt": "1_1\t-0.49\tok product\nthis line has no fields\n\n",
    "nytEditorialSnippets_GroundTruth.txt": "1_1\t4.0\tGreat news\n1_2\tnot-a-number\tbroken\n",
}


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TAPL_CACHE", str(cache))
    return cache


def test_cache_dir_honours_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPL_CACHE", str(tmp_path / "explicit"))
    assert sources.cache_dir() == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()
    monkeypatch.delenv("TAPL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir() == tmp_path / "xdg" / "tapl"


def test_digits_parquet(isolated_cache: Path) -> None:
    path = sources.digits_parquet()
    assert path.parent == isolated_cache
    frame = pq.read_table(path).to_pandas()
    assert list(frame.columns) == ["image", "label"]
    assert len(frame) == 1797
    images = np.stack(frame["image"].to_numpy())
    assert images.shape == (1797, 64)
    assert images.min() == 0.0
    assert images.max() == 1.0
    assert set(frame["label"]) == set(range(10))
    assert not list(isolated_cache.glob("*.tmp")), "no temporary file is left behind"

    mtime = path.stat().st_mtime_ns
    assert sources.digits_parquet() == path
    assert path.stat().st_mtime_ns == mtime


def test_digits_parquet_explicit_root(tmp_path: Path) -> None:
    assert sources.digits_parquet(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "digits.parquet"


def test_parse_vader_sdist(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sdist = _build_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", _GROUND_TRUTH)
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        frame = sources.parse_vader_sdist(sdist)

    assert list(frame.columns) == ["text", "score", "domain", "label"]
    assert frame["label"].dtype == np.int64
    assert frame["score"].dtype == np.float64
    expected = pd.DataFrame(
        [
            ("I love this!", 2.7, "tweets", 2),
            ("meh, bad", -0.5, "tweets", 0),
            ("it is a day", 0.49, "tweets", 1),
            ("The worst film, naïvely made", -3.2, "movies", 0),
            ("A café scene", 0.5, "movies", 2),
            ("ok product", -0.49, "products", 1),
            ("Great news", 4.0, "news", 2),
        ],
        columns=["text", "score", "domain", "label"],
    )
    pd.testing.assert_frame_equal(frame, expected)
    assert not frame["text"].str.contains("\r").any()
    skipped = " ".join(record.getMessage() for record in caplog.records)
    assert "Skipped 1 malformed line(s) in amazonReviewSnippets_GroundTruth.txt" in skipped
    assert "Skipped 1 malformed line(s) in nytEditorialSnippets_GroundTruth.txt" in skipped


def test_parse_vader_sdist_missing_file_raises(tmp_path: Path) -> None:
    files = {k: v for k, v in _GROUND_TRUTH.items() if not k.startswith("tweets")}
    sdist = _build_sdist(tmp_path / "sdist.tar.gz", files)
    with pytest.raises(ValueError, match=r"tweets_GroundTruth\.txt"):
        sources.parse_vader_sdist(sdist)


def test_vader_offline_without_cache_raises(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPL_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when TAPL_OFFLINE=1")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(RuntimeError, match="TAPL_OFFLINE"):
        sources.vader_sentences_parquet()


def test_vader_download_parses_and_caches(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TAPL_OFFLINE", raising=False)
    calls: list[list[str]] = []

    def fake_pip(command: list[str], check: bool) -> None:
        calls.append(command)
        destination = Path(command[command.index("-d") + 1])
        _build_sdist(destination / "vaderSentiment-3.3.2.tar.gz", _GROUND_TRUTH)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = sources.vader_sentences_parquet()
    assert path == isolated_cache / "vader_sentences.parquet"
    assert len(calls) == 1
    assert "--no-binary" in calls[0]
    assert "vadersentiment==3.3.2" in calls[0]
    frame = pq.read_table(path).to_pandas()
    assert len(frame) == 7
    assert set(frame["domain"]) == {"tweets", "movies", "products", "news"}

    # Cached now: neither pip nor TAPL_OFFLINE matters any more.
    monkeypatch.setenv("TAPL_OFFLINE", "1")
    assert sources.vader_sentences_parquet() == path
    assert len(calls) == 1


def test_digit_questions_answer_from_the_true_label(tmp_path: Path) -> None:
    frame = pd.read_parquet(sources.digit_questions_parquet(tmp_path))
    assert len(frame) == 1797
    parity = frame["question"] == sources.DIGIT_QUESTIONS[0]
    assert parity.sum() == 899
    assert (frame.loc[parity, "answer"] == (frame.loc[parity, "label"] % 2 == 0)).all()
    assert (frame.loc[~parity, "answer"] == (frame.loc[~parity, "label"] > 4)).all()
    assert (frame["caption"] == [sources.DIGIT_WORDS[i] for i in frame["label"]]).all()
