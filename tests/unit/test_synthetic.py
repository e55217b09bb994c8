"""Unit tests of the synthetic trips, the trip file readers and the records made of the rows."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from datetime import datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taxi_pipeline.errors import InvalidEventError
from taxi_pipeline.events import parse_event
from taxi_pipeline.tooling.producer import CORRUPTIONS, encode_row, plan_traffic
from taxi_pipeline.tooling.sample import (
    SampleFormatError,
    SampleNotFoundError,
    read_sample,
)
from taxi_pipeline.tooling.synthetic import END_COLUMNS, START_COLUMNS, generate_trips

PORTAL_TIMESTAMP = re.compile(r"^\d{4}/\d{2}/\d{2} (0\d|1[0-2]):[0-5]\d:[0-5]\d (AM|PM)$")
SEPARATED_NUMBER = re.compile(r"^\d{1,3}(,\d{3})*(\.\d+)?$")
MONEY_COLUMNS = ("meter_fare_amount", "tolls", "sf_exit_fee", "other_fees", "tip", "extra_amount")
CHARGE_COLUMNS = ("tolls", "sf_exit_fee", "other_fees", "tip", "extra_amount")


@pytest.fixture(scope="module")
def trips():
    return generate_trips(400, seed=11)


def test_columns_are_the_export_columns(trips):
    assert all(tuple(row) == START_COLUMNS for row in trips.start_rows)
    assert all(tuple(row) == END_COLUMNS for row in trips.end_rows)


def test_columns_match_the_real_sample(sample_dir):
    real = read_sample(sample_dir)

    assert tuple(real.start_rows[0]) == START_COLUMNS
    assert tuple(real.end_rows[0]) == END_COLUMNS


def test_every_trip_has_one_start_and_one_end(trips):
    start_ids = [row["trip_id"] for row in trips.start_rows]
    end_ids = [row["trip_id"] for row in trips.end_rows]

    assert len(start_ids) == 400
    assert len(set(start_ids)) == 400
    assert sorted(start_ids) == sorted(end_ids)


def test_timestamps_use_the_portal_form(trips):
    ends = {row["trip_id"]: row["end_time_local"] for row in trips.end_rows}

    for row in trips.start_rows:
        assert PORTAL_TIMESTAMP.match(row["start_time_local"])
        assert PORTAL_TIMESTAMP.match(ends[row["trip_id"]])
        started = datetime.strptime(row["start_time_local"], "%Y/%m/%d %I:%M:%S %p")
        ended = datetime.strptime(ends[row["trip_id"]], "%Y/%m/%d %I:%M:%S %p")
        assert ended > started


def test_counts_are_text_with_separators(trips):
    for row in trips.end_rows:
        assert SEPARATED_NUMBER.match(row["fare_time_milliseconds"])
        assert SEPARATED_NUMBER.match(row["trip_distance_meters"])

    assert any("," in row["fare_time_milliseconds"] for row in trips.end_rows)
    assert any("." in row["trip_distance_meters"] for row in trips.end_rows)
    assert any(row["trip_distance_meters"] == "0" for row in trips.end_rows)


def test_money_is_float_or_null(trips):
    for row in trips.end_rows:
        for column in (*MONEY_COLUMNS, "total_fare_amount", "paratransit"):
            assert row[column] is None or type(row[column]) is float
        assert row["promo_rate"] is None

    nulls = Counter(column for row in trips.end_rows for column in MONEY_COLUMNS if row[column] is None)
    assert nulls["tolls"] > 0
    assert nulls["sf_exit_fee"] > 0
    assert nulls["meter_fare_amount"] == 0


def test_totals_are_consistent(trips):
    upfront = {row["trip_id"]: row["upfront_pricing"] for row in trips.start_rows}

    for row in trips.end_rows:
        base = upfront[row["trip_id"]] if row["fare_type"] == "upfront_pricing" else row["meter_fare_amount"]
        charges = [row[column] for column in CHARGE_COLUMNS if row[column] is not None]
        expected = sum((Decimal(repr(value)) for value in [base, *charges]), Decimal(0))
        assert Decimal(repr(row["total_fare_amount"])) == expected


def test_quirks_of_the_export_are_present(trips):
    assert any(row["driver_id"] == "-" for row in trips.start_rows)
    assert any(row["pickup_location_latitude"] is None for row in trips.start_rows)
    assert any(row["upfront_pricing"] is not None for row in trips.start_rows)
    assert any((row["qa_flags"] or "").endswith("DR-") for row in trips.end_rows)
    assert {row["hail_type"] for row in trips.start_rows} == {
        "street",
        "dispatch",
        "flywheel_uber",
        "yo_taxi_app",
        "flywheel_app",
    }


def test_same_seed_gives_same_trips():
    assert generate_trips(50, seed=3) == generate_trips(50, seed=3)
    assert generate_trips(50, seed=3).start_rows != generate_trips(50, seed=4).start_rows


def test_run_is_marked_synthetic(trips):
    assert trips.synthetic is True
    assert trips.seed == 11
    assert "generated trips" in trips.source
    assert "not real data" in trips.source


def test_every_row_is_a_valid_event(trips):
    for row in trips.start_rows:
        assert parse_event(row, "start").trip_id == row["trip_id"]
    for row in trips.end_rows:
        assert parse_event(row, "end").trip_id == row["trip_id"]


def test_zero_trips_is_rejected():
    with pytest.raises(ValueError, match="trip count 0"):
        generate_trips(0)


# --- Trip files ----------------------------------------------------------------------


def write_json_lines(path, rows) -> None:
    path.write_text("".join(encode_row(row).decode() + "\n" for row in rows), encoding="utf-8")


def write_csv(path, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            [{name: "" if value is None else value for name, value in row.items()} for row in rows]
        )


def test_parquet_files_read_back_unchanged(tmp_path):
    trips = generate_trips(20, seed=5)
    pq.write_table(pa.Table.from_pylist(list(trips.start_rows)), tmp_path / "start_taxi_trips.parquet")
    pq.write_table(pa.Table.from_pylist(list(trips.end_rows)), tmp_path / "end_taxi_trips.parquet")

    read = read_sample(tmp_path)

    assert read.start_rows == trips.start_rows
    assert read.end_rows == trips.end_rows
    assert read.synthetic is False


def test_json_lines_keep_every_digit(tmp_path):
    trips = generate_trips(20, seed=5)
    write_json_lines(tmp_path / "start_taxi_trips_sample.jsonl", trips.start_rows)
    write_json_lines(tmp_path / "end_taxi_trips_sample.jsonl", trips.end_rows)

    read = read_sample(tmp_path)

    first = read.end_rows[0]
    assert isinstance(first["total_fare_amount"], Decimal)
    assert first["total_fare_amount"] == Decimal(repr(trips.end_rows[0]["total_fare_amount"]))
    assert [row["trip_id"] for row in read.start_rows] == [row["trip_id"] for row in trips.start_rows]


def test_csv_empty_cells_read_as_null(tmp_path):
    trips = generate_trips(20, seed=5)
    write_csv(tmp_path / "start_taxi_trips.csv", trips.start_rows)
    write_csv(tmp_path / "end_taxi_trips.csv", trips.end_rows)

    read = read_sample(tmp_path)

    assert all(row["promo_rate"] is None for row in read.end_rows)
    assert read.end_rows[0]["fare_time_milliseconds"] == trips.end_rows[0]["fare_time_milliseconds"]
    for row in read.end_rows:
        parse_event(row, "end")


def test_missing_folder_error_names_the_fix(tmp_path):
    missing = tmp_path / "absent"

    with pytest.raises(SampleNotFoundError) as caught:
        read_sample(missing)

    message = str(caught.value)
    assert str(missing) in message
    assert "start_taxi_trips_sample.parquet" in message
    assert "TAXI_SAMPLE_DIR" in message
    assert "--data" in message


def test_missing_end_file_error_lists_expected_names(tmp_path):
    write_json_lines(tmp_path / "start_taxi_trips.jsonl", generate_trips(2).start_rows)

    with pytest.raises(SampleNotFoundError, match="no end file in trip data folder") as caught:
        read_sample(tmp_path)

    assert "end_taxi_trips_sample.csv" in str(caught.value)


def test_two_start_files_are_rejected(tmp_path):
    trips = generate_trips(2)
    write_json_lines(tmp_path / "start_taxi_trips.jsonl", trips.start_rows)
    write_csv(tmp_path / "start_taxi_trips.csv", trips.start_rows)
    write_csv(tmp_path / "end_taxi_trips.csv", trips.end_rows)

    with pytest.raises(SampleFormatError, match="more than one start file"):
        read_sample(tmp_path)


def test_environment_variable_names_the_folder(tmp_path, monkeypatch):
    trips = generate_trips(3)
    write_json_lines(tmp_path / "start_taxi_trips.jsonl", trips.start_rows)
    write_json_lines(tmp_path / "end_taxi_trips.jsonl", trips.end_rows)
    monkeypatch.setenv("TAXI_SAMPLE_DIR", str(tmp_path))

    assert read_sample().source == str(tmp_path.resolve())


def test_limit_picks_whole_trips():
    limited = generate_trips(30, seed=2).limited(10, seed=1)

    assert len(limited.trip_ids()) == 10
    assert {row["trip_id"] for row in limited.start_rows} == {row["trip_id"] for row in limited.end_rows}
    assert limited == generate_trips(30, seed=2).limited(10, seed=1)


# --- Records made of the rows --------------------------------------------------------


def test_rows_serialise_without_losing_digits():
    row = {
        "trip_id": "t",
        "tip": 0.1,
        "total_fare_amount": 18.75,
        "exact": Decimal("2.50"),
        "n": None,
    }

    assert encode_row(row) == b'{"trip_id":"t","tip":0.1,"total_fare_amount":18.75,"exact":2.50,"n":null}'


def test_corrupted_copies_get_their_reason():
    plan = plan_traffic(generate_trips(40, seed=9), seed=9)
    corrupted = [record for record in plan.records if record.role == "corrupted"]

    assert sorted(record.corruption for record in corrupted) == sorted(item.name for item in CORRUPTIONS)
    for record in corrupted:
        with pytest.raises(InvalidEventError) as caught:
            parse_event(record.data, record.kind)
        assert caught.value.reason == record.expected_reason, record.corruption


def test_plan_mixes_order_and_duplicates():
    trips = generate_trips(40, seed=9)

    plan = plan_traffic(trips, seed=9, corrupt=False)

    counts = plan.counts()
    assert counts["event"] == 80
    assert counts["duplicate"] == 4
    assert len(plan.ends_first_trips) == 4
    waves = {(record.trip_id, record.kind): record.wave for record in plan.records if record.role == "event"}
    for trip_id in plan.ends_first_trips:
        assert waves[(trip_id, "end")] < waves[(trip_id, "start")]
    later = [trip_id for trip_id in trips.trip_ids() if trip_id not in plan.ends_first_trips]
    assert all(waves[(trip_id, "end")] > waves[(trip_id, "start")] for trip_id in later)
    assert [record.wave for record in plan.records] == sorted(record.wave for record in plan.records)
    assert all(json.loads(record.data)["trip_id"] == record.trip_id for record in plan.records)


def test_missing_default_folder_falls_back(tmp_path, monkeypatch):
    from taxi_pipeline.tooling import sample
    from taxi_pipeline.tooling.demo import load_trips

    monkeypatch.setattr(sample, "DEFAULT_SAMPLE_DIR", tmp_path / "absent")
    monkeypatch.delenv("TAXI_SAMPLE_DIR", raising=False)

    trips = load_trips(None, synthetic=False, synthetic_trips=12, seed=1)

    assert trips.synthetic is True
    assert len(trips.trip_ids()) == 12
    assert f"no trip files in {tmp_path / 'absent'}" in trips.source


def test_named_folder_has_no_fallback(tmp_path, monkeypatch):
    from taxi_pipeline.tooling.demo import load_trips

    monkeypatch.delenv("TAXI_SAMPLE_DIR", raising=False)

    with pytest.raises(SampleNotFoundError):
        load_trips(tmp_path / "absent", synthetic=False, synthetic_trips=12, seed=1)
