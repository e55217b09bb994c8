"""Telling a backfill source's format from its name or its files."""

from __future__ import annotations

import pytest

from taxi_pipeline.replay.backfill import guess_format


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("s3://b/trips.parquet", "parquet"),
        ("/d/events.jsonl", "json"),
        ("/d/a.json", "json"),
        ("/d/e.CSV", "csv"),
    ],
)
def test_format_from_file_name(name, fmt):
    assert guess_format(name) == fmt


def test_format_from_folder_contents(tmp_path):
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "start.parquet").write_bytes(b"")
    assert guess_format(str(tmp_path)) == "parquet"


def test_mixed_folder_needs_a_format(tmp_path):
    (tmp_path / "a.csv").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match="several formats"):
        guess_format(str(tmp_path))


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no .parquet"):
        guess_format(str(tmp_path))


def test_s3_prefix_needs_a_format():
    with pytest.raises(ValueError, match="--source_format in the job"):
        guess_format("s3://bucket/backfill/")


def test_missing_source_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        guess_format(str(tmp_path / "absent"))
