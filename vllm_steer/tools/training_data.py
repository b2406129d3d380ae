"""Training data for `vllm-steer train`: labelled texts from JSONL/CSV or a pair of plain-text
files, with the provenance (files, sha256, label counts) recorded in the trained steer."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LabelledText:
    text: str
    labels: tuple[float, ...]  # one per trained dim, each in [-1, 1]




def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _labels_from_record(record: dict[str, Any], dim_names: Sequence[str], where: str) -> tuple[float, ...]:
    """A record's labels: a column per dim name, or `label` when there is a single dim."""
    labels = []
    for name in dim_names:
        key = name if name in record else ("label" if len(dim_names) == 1 and "label" in record else None)
        if key is None:
            raise ValueError(f"{where}: no label for dim {name!r} (columns: {sorted(record)})")
        value = float(record[key])
        if not (math.isfinite(value) and -1.0 <= value <= 1.0):
            raise ValueError(f"{where}: label {value} for dim {name!r} is not in [-1, 1]")
        labels.append(value)
    return tuple(labels)


def load_labelled_file(path: str | Path, dim_names: Sequence[str]) -> list[LabelledText]:
    """JSONL (one object per line) or CSV (header row) with a `text` column and labels."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples = []
    for i, record in enumerate(records, 1):
        where = f"{path}:{i + (1 if path.suffix.lower() == '.csv' else 0)}"
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{where}: no text field")
        examples.append(LabelledText(record["text"], _labels_from_record(record, dim_names, where)))
    return examples


def load_text_pair(positive: str | Path, negative: str | Path) -> list[LabelledText]:
    """Two plain-text files, one example per non-empty line: positive -> +1, negative -> -1."""
    out = []
    for path, label in ((positive, 1.0), (negative, -1.0)):
        out += [LabelledText(line.strip(), (label,)) for line in Path(path).read_text().splitlines() if line.strip()]
    return out


def data_provenance(paths: Sequence[str | Path], examples: Sequence[LabelledText]) -> dict[str, Any]:
    """What the steer was trained on: files with their sha256, and label counts."""
    first = [e.labels[0] for e in examples]
    return {
        "files": [{"path": str(p), "sha256": file_sha256(p)} for p in paths],
        "examples": len(examples),
        "positive": sum(v > 0 for v in first),
        "negative": sum(v < 0 for v in first),
        "zero": sum(v == 0 for v in first),
    }
