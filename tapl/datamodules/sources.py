"""Real datasets that work offline, prepared once into a user cache directory as parquet files.

Each ``*_parquet`` function returns the path of a parquet file, building it on first use, so the engine can
load it with ``datasets.load_dataset("parquet", data_files=str(path))``. Files are written atomically (a
temporary file, then :func:`os.replace`), so concurrent processes never see a half-written file.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["cache_dir", "digits_parquet", "parse_vader_sdist", "vader_sentences_parquet"]

log = logging.getLogger(__name__)

VADER_REQUIREMENT = "vadersentiment==3.3.2"

# Ground-truth file stems inside hutto_ICWSM_2014.tar.gz, mapped to the domain names we expose.
VADER_DOMAINS: dict[str, str] = {
    "tweets": "tweets",
    "movieReviewSnippets": "movies",
    "amazonReviewSnippets": "products",
    "nytEditorialSnippets": "news",
}

#: Scores at or beyond +-0.5 count as positive / negative; the band between is neutral.
VADER_NEUTRAL_BAND = 0.5

_VADER_SCHEMA = pa.schema(
    [
        pa.field("text", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("domain", pa.string()),
        pa.field("label", pa.int64()),
    ]
)


def cache_dir() -> Path:
    """Return tapl's data cache directory, creating it if needed.

    ``$TAPL_CACHE`` if set; otherwise ``$XDG_CACHE_HOME/tapl`` if ``XDG_CACHE_HOME`` is set; otherwise
    ``~/.cache/tapl``.

    Returns:
        The cache directory.
    """
    if override := os.environ.get("TAPL_CACHE"):
        path = Path(override).expanduser()
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        path = Path(xdg).expanduser() / "tapl"
    else:
        path = Path.home() / ".cache" / "tapl"
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_parquet(root: Path | None = None) -> Path:
    """Return a parquet file of scikit-learn's bundled handwritten digits, building it on first use.

    The 1,797 real 8x8 grey-scale images of ``sklearn.datasets.load_digits`` (UCI Optical Recognition of
    Handwritten Digits), with pixel values 0..16 scaled to [0, 1]. Needs no network.

    Columns: ``image`` (list of 64 floats, row-major 8x8) and ``label`` (int 0-9).

    Args:
        root: Directory for the file; defaults to :func:`cache_dir`.

    Returns:
        Path of ``digits.parquet``; an existing file is reused as is.
    """
    # Imported here because scikit-learn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits

    path = _resolve_root(root) / "digits.parquet"
    if path.exists():
        return path
    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0).reshape(len(digits.images), 64)
    table = pa.table(
        {
            "image": pa.array(list(images), type=pa.list_(pa.float32())),
            "label": pa.array(np.asarray(digits.target, dtype=np.int64)),
        }
    )
    _write_atomic(table, path)
    log.info("Wrote %d digit images to %s", table.num_rows, path)
    return path


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_QUESTIONS = ("is the digit even?", "is the digit larger than four?")


def digit_questions_parquet(root: Path | None = None) -> Path:
    """Return a parquet file of questions and captions about the real digit images of :func:`digits_parquet`.

    A task derived from real data, for image+text and image-to-text tasks without a network: each of the
    1,797 images gets one yes/no question (alternating between the two of :data:`DIGIT_QUESTIONS`), its
    answer computed from the image's true label, and a caption naming the digit (``"seven"``).

    Columns: ``image`` (64 floats in [0, 1]), ``question`` (str), ``answer`` (int: 0 no, 1 yes),
    ``caption`` (str), ``label`` (int 0-9).

    Args:
        root: Directory for the file; defaults to :func:`cache_dir`.

    Returns:
        Path of ``digit_questions.parquet``; an existing file is reused as is.
    """
    path = _resolve_root(root) / "digit_questions.parquet"
    if path.exists():
        return path
    digits = pq.read_table(digits_parquet(root))
    labels = np.asarray(digits.column("label").to_pylist(), dtype=np.int64)
    asks_parity = np.arange(len(labels)) % 2 == 0
    answers = np.where(asks_parity, labels % 2 == 0, labels > 4).astype(np.int64)
    table = pa.table(
        {
            "image": digits.column("image"),
            "question": pa.array([DIGIT_QUESTIONS[0] if p else DIGIT_QUESTIONS[1] for p in asks_parity]),
            "answer": pa.array(answers),
            "caption": pa.array([DIGIT_WORDS[label] for label in labels]),
            "label": pa.array(labels),
        }
    )
    _write_atomic(table, path)
    log.info("Wrote %d digit questions to %s", table.num_rows, path)
    return path


def vader_sentences_parquet(root: Path | None = None) -> Path:
    """Return a parquet file of VADER's human-rated sentences, downloading them on first use.

    The sentence-level ground truth of Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for
    Sentiment Analysis of Social Media Text", Proc. ICWSM 2014 (MIT licence): about 23.7k tweets, movie
    review snippets, Amazon product review snippets and New York Times editorial snippets, each with the
    mean of about 20 human sentiment ratings in [-4, 4]. The data ship in the source distribution of
    ``vaderSentiment==3.3.2`` on the Python package index, which is fetched with ``pip download`` only when
    the parquet file is not cached yet. Rows are shuffled with seed 0, since the movie file is sorted by
    score.

    Columns: ``text`` (str), ``score`` (float), ``domain`` (``tweets``, ``movies``, ``products`` or
    ``news``) and ``label`` (0 = negative for score <= -0.5, 1 = neutral, 2 = positive for score >= 0.5).

    Args:
        root: Directory for the file; defaults to :func:`cache_dir`.

    Returns:
        Path of ``vader_sentences.parquet``; an existing file is reused as is.

    Raises:
        RuntimeError: If ``TAPL_OFFLINE=1`` is set and the file is not cached.
        subprocess.CalledProcessError: If ``pip download`` fails.
    """
    path = _resolve_root(root) / "vader_sentences.parquet"
    if path.exists():
        return path
    if os.environ.get("TAPL_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise RuntimeError(
            f"The VADER sentence data are not cached at {path} and TAPL_OFFLINE is set, so they cannot be "
            "downloaded. Prepare them once on a machine with access to the Python package index by running "
            "`python -c 'from tapl.datamodules.sources import vader_sentences_parquet; "
            "vader_sentences_parquet()'` (with the same TAPL_CACHE), or copy vader_sentences.parquet into "
            f"{path.parent}."
        )
    with tempfile.TemporaryDirectory(prefix="tapl-vader-") as tmpdir:
        log.info("Downloading the %s source distribution for the VADER sentence data", VADER_REQUIREMENT)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                VADER_REQUIREMENT,
                "-d",
                tmpdir,
            ],
            check=True,
        )
        sdists = sorted(Path(tmpdir).glob("*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download of {VADER_REQUIREMENT} produced no .tar.gz source distribution.")
        frame = parse_vader_sdist(sdists[0])
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    _write_atomic(pa.Table.from_pandas(frame, schema=_VADER_SCHEMA, preserve_index=False), path)
    log.info("Wrote %d VADER sentences to %s", len(frame), path)
    return path


def parse_vader_sdist(sdist: Path) -> pd.DataFrame:
    """Read the four sentence ground-truth files out of a ``vaderSentiment`` source distribution.

    The sdist holds ``*/additional_resources/hutto_ICWSM_2014.tar.gz``, a nested tarball with
    ``hutto_ICWSM_2014/<stem>_GroundTruth.txt`` for each stem in :data:`VADER_DOMAINS`: tab-separated
    ``id<TAB>score<TAB>sentence`` lines. Blank lines are ignored; malformed lines (too few fields, an empty
    id, a score that is not a number in [-4, 4], empty text) are skipped and counted in a warning.

    Args:
        sdist: Path of the ``.tar.gz`` source distribution.

    Returns:
        A frame with columns ``text``, ``score``, ``domain`` and ``label``, in file order, each sentence once
        (later repeats of a sentence are dropped).

    Raises:
        ValueError: If the sdist lacks the nested tarball or one of the ground-truth files.
    """
    with tarfile.open(sdist, mode="r:*") as outer:
        nested = next(
            (m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")),
            None,
        )
        handle = outer.extractfile(nested) if nested is not None and nested.isfile() else None
        if handle is None:
            raise ValueError(f"{sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz file.")
        nested_bytes = handle.read()

    rows: list[tuple[str, float, str, int]] = []
    with tarfile.open(fileobj=io.BytesIO(nested_bytes), mode="r:*") as inner:
        members = {m.name.rsplit("/", 1)[-1]: m for m in inner.getmembers() if m.isfile()}
        for stem, domain in VADER_DOMAINS.items():
            name = f"{stem}_GroundTruth.txt"
            member = members.get(name)
            handle = inner.extractfile(member) if member is not None else None
            if handle is None:
                raise ValueError(f"{sdist}: hutto_ICWSM_2014.tar.gz has no {name}.")
            parsed, malformed = _parse_ground_truth(handle.read(), domain)
            if malformed:
                log.warning("Skipped %d malformed line(s) in %s", malformed, name)
            rows.extend(parsed)

    frame = pd.DataFrame(rows, columns=["text", "score", "domain", "label"])
    # A few short sentences ("wow.") repeat across files; one copy keeps them out of both train and test.
    duplicated = frame["text"].duplicated()
    if duplicated.any():
        log.info("Dropped %d repeated sentence(s)", int(duplicated.sum()))
        frame = frame[~duplicated].reset_index(drop=True)
    return frame.astype({"text": str, "score": "float64", "domain": str, "label": "int64"})


def _parse_ground_truth(raw: bytes, domain: str) -> tuple[list[tuple[str, float, str, int]], int]:
    try:
        # utf-8-sig drops a byte-order mark, which some of the resource files carry.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s ground truth is not valid UTF-8; decoding it as cp1252", domain)
        text = raw.decode("cp1252", errors="replace")
    rows: list[tuple[str, float, str, int]] = []
    malformed = 0
    # Split on "\n" only: str.splitlines would also break sentences at characters such as U+2028 or U+0085.
    for raw_line in text.split("\n"):
        line = raw_line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            score = float(fields[1])
        except (IndexError, ValueError):
            malformed += 1
            continue
        sentence = fields[2].strip() if len(fields) == 3 else ""
        if not fields[0].strip() or not sentence or not -4.0 <= score <= 4.0:
            malformed += 1
            continue
        rows.append((sentence, score, domain, _sentiment_label(score)))
    return rows, malformed


def _sentiment_label(score: float) -> int:
    if score <= -VADER_NEUTRAL_BAND:
        return 0
    if score >= VADER_NEUTRAL_BAND:
        return 2
    return 1


def _resolve_root(root: Path | None) -> Path:
    if root is None:
        return cache_dir()
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_atomic(table: pa.Table, path: Path) -> None:
    # A temporary file in the same directory, then os.replace, so readers (or a second rank preparing the
    # same file) only ever see a complete parquet file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
