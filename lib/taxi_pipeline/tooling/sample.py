"""Find and read a folder of start-trip and end-trip rows: Parquet, JSON Lines or CSV.

A folder contains one start file and one end file, named
``start_taxi_trips_sample.<ext>`` and ``end_taxi_trips_sample.<ext>`` (the
``_sample`` part is optional), where ``<ext>`` is ``parquet``, ``jsonl`` or
``csv``. The default folder is ``../shared/data/sf_taxi_trips`` next to the
repository; the environment variable ``TAXI_SAMPLE_DIR`` or the CLI option
``--data`` names another one.

Rows keep the types their file gives them, because the pipeline must cope
with exactly those: Parquet gives floats for money and strings with
thousands separators for counts, JSON Lines numbers are read as ``Decimal``
so that no digit is lost, and CSV gives text, with empty cells read as null.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

# lib/taxi_pipeline/tooling/sample.py -> the repository root. Tooling is not
# shipped, so it always runs from a source checkout.
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "sf_taxi_trips"
SAMPLE_DIR_VARIABLE = "TAXI_SAMPLE_DIR"

FILE_STEMS: dict[str, tuple[str, ...]] = {
    "start": ("start_taxi_trips_sample", "start_taxi_trips"),
    "end": ("end_taxi_trips_sample", "end_taxi_trips"),
}
FILE_SUFFIXES = (".parquet", ".jsonl", ".csv")


class SampleNotFoundError(FileNotFoundError):
    """The folder of trip rows, or one of its two files, is missing."""


class SampleFormatError(ValueError):
    """A trip file cannot be read: bad JSON, a row without ``trip_id``, or an unknown format."""


@dataclass(frozen=True)
class TripSample:
    """Start-trip and end-trip rows, and where they came from.

    ``source`` is a folder path, or a description of the synthetic data.
    """

    start_rows: tuple[dict[str, Any], ...]
    end_rows: tuple[dict[str, Any], ...]
    source: str
    synthetic: bool = False
    seed: int | None = None

    def trip_ids(self) -> list[str]:
        """Return every trip id once: those with a start row first, in file order."""
        ordered = dict.fromkeys(row["trip_id"] for row in self.start_rows)
        ordered.update(dict.fromkeys(row["trip_id"] for row in self.end_rows))
        return list(ordered)

    def restricted_to(self, trip_ids: Iterable[str]) -> TripSample:
        """Return the rows of the given trips only, in their original order."""
        wanted = set(trip_ids)
        return replace(
            self,
            start_rows=tuple(row for row in self.start_rows if row["trip_id"] in wanted),
            end_rows=tuple(row for row in self.end_rows if row["trip_id"] in wanted),
        )

    def limited(self, limit: int | None, seed: int = 0) -> TripSample:
        """Return a seeded random subset of ``limit`` trips, or the whole sample for ``None``."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"limit {limit} is invalid: use a number of trips of at least 1")
        trip_ids = self.trip_ids()
        if limit >= len(trip_ids):
            return self
        chosen = random.Random(seed).sample(trip_ids, limit)
        return self.restricted_to(chosen)


def resolve_sample_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """Return ``folder``, else ``$TAXI_SAMPLE_DIR``, else the default sample folder."""
    if folder:
        return Path(folder).expanduser()
    from_environment = os.environ.get(SAMPLE_DIR_VARIABLE)
    if from_environment:
        return Path(from_environment).expanduser()
    return DEFAULT_SAMPLE_DIR


def expected_file_names(kind: str) -> list[str]:
    """Return the accepted file names for one kind of row, such as ``start_taxi_trips.csv``."""
    return [f"{stem}{suffix}" for stem in FILE_STEMS[kind] for suffix in FILE_SUFFIXES]


def locate_sample_files(folder: Path) -> tuple[Path, Path]:
    """Return the start file and the end file in ``folder``.

    Raises ``SampleNotFoundError`` naming the folder, the expected file names
    and how to point at another folder, or ``SampleFormatError`` when a kind
    has more than one file, since then it is unclear which one to read.
    """
    if not folder.is_dir():
        raise SampleNotFoundError(
            f"trip data folder {folder} not found. Put "
            f"{expected_file_names('start')[0]} and {expected_file_names('end')[0]} "
            f"(or .jsonl, .csv) there, point --data or {SAMPLE_DIR_VARIABLE} at another "
            "folder, or use --synthetic for generated trips"
        )

    found: dict[str, Path] = {}
    for kind in FILE_STEMS:
        candidates = [folder / name for name in expected_file_names(kind) if (folder / name).is_file()]
        if not candidates:
            raise SampleNotFoundError(
                f"no {kind} file in trip data folder {folder}: expected one of "
                f"{', '.join(expected_file_names(kind))}. Point --data or "
                f"{SAMPLE_DIR_VARIABLE} at another folder, or use --synthetic for generated trips"
            )
        if len(candidates) > 1:
            raise SampleFormatError(
                f"more than one {kind} file in {folder}: "
                f"{', '.join(path.name for path in candidates)}; keep only one"
            )
        found[kind] = candidates[0]
    return found["start"], found["end"]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read every row of one Parquet, JSON Lines or CSV file as a dict."""
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix == ".jsonl":
        rows = _read_json_lines(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    else:
        raise SampleFormatError(f"{path} has an unknown format: use {', '.join(FILE_SUFFIXES)}")

    for number, row in enumerate(rows, start=1):
        trip_id = row.get("trip_id")
        if not isinstance(trip_id, str) or not trip_id.strip():
            raise SampleFormatError(f"row {number} of {path} has no trip_id")
    return rows


def read_sample(folder: str | os.PathLike[str] | None = None) -> TripSample:
    """Read the start and end rows of a folder (see ``resolve_sample_dir``)."""
    directory = resolve_sample_dir(folder)
    start_path, end_path = locate_sample_files(directory)
    return TripSample(
        start_rows=tuple(read_rows(start_path)),
        end_rows=tuple(read_rows(end_path)),
        source=str(directory.resolve()),
    )


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as parquet

    return parquet.read_table(path).to_pylist()


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_float=Decimal)
            except json.JSONDecodeError as exc:
                raise SampleFormatError(f"line {number} of {path} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise SampleFormatError(f"line {number} of {path} is not a JSON object")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [
            {name: (value if value != "" else None) for name, value in row.items()}
            for row in csv.DictReader(handle)
        ]
