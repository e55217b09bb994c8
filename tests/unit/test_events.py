"""Unit tests of event parsing, normalisation and validation."""

from __future__ import annotations

from decimal import Decimal

import pyarrow.parquet as pq
import pytest

from taxi_pipeline.errors import InvalidEventError
from taxi_pipeline.events import (
    MAX_EVENT_BYTES,
    EventKind,
    event_from_json,
    event_to_json,
    infer_kind,
    parse_event,
    revision_of,
)


def start_body(**fields) -> dict:
    body = {"trip_id": "trip-1", "start_time_local": "2023/01/23 06:37:21 AM"}
    body.update(fields)
    return body


def end_body(**fields) -> dict:
    body = {"trip_id": "trip-1", "end_time_local": "2023/01/23 06:49:34 AM"}
    body.update(fields)
    return body


def reasons_of(body, kind=EventKind.START) -> tuple[str, ...]:
    with pytest.raises(InvalidEventError) as caught:
        parse_event(body, kind)
    return caught.value.reasons


def test_real_sample_events_are_all_valid(sample_dir):
    # GIVEN the 200 real start events and 200 real end events
    for name, kind in (("start", EventKind.START), ("end", EventKind.END)):
        rows = pq.read_table(sample_dir / f"{name}_taxi_trips_sample.parquet").to_pylist()
        assert len(rows) == 200

        # WHEN each row is parsed THEN it is valid and keeps its trip id
        for row in rows:
            event = parse_event(row, kind)
            assert event.trip_id == row["trip_id"]
            assert event.ignored_fields == ()


def test_real_sample_quirks_are_normalised(sample_dir):
    starts = pq.read_table(sample_dir / "start_taxi_trips_sample.parquet").to_pylist()
    ends = pq.read_table(sample_dir / "end_taxi_trips_sample.parquet").to_pylist()

    placeholder_rows = [row for row in starts if row["driver_id"] == "-"]
    assert placeholder_rows, "the sample has rows with the '-' driver id placeholder"
    for row in placeholder_rows:
        assert parse_event(row, EventKind.START).attributes["driver_id"] is None

    for row in ends:
        event = parse_event(row, EventKind.END)
        millis = row["fare_time_milliseconds"]
        if millis is not None:
            assert event.attributes["fare_time_milliseconds"] == Decimal(millis.replace(",", ""))
        for money in ("meter_fare_amount", "tip", "total_fare_amount"):
            value = event.attributes[money]
            assert value is None or isinstance(value, Decimal)


def test_portal_timestamp_becomes_iso_with_offset():
    event = parse_event(start_body(start_time_local="2023/01/23 06:37:21 PM"), EventKind.START)
    assert event.attributes["start_time_local"] == "2023-01-23T18:37:21-08:00"


def test_summer_timestamp_uses_daylight_offset():
    event = parse_event(start_body(start_time_local="2023/07/04 12:00:00 AM"), EventKind.START)
    assert event.attributes["start_time_local"] == "2023-07-04T00:00:00-07:00"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2023-01-23T14:37:21Z", "2023-01-23T06:37:21-08:00"),
        ("2023-01-23T06:37:21", "2023-01-23T06:37:21-08:00"),
        ("2023-01-23T09:37:21-05:00", "2023-01-23T06:37:21-08:00"),
    ],
)
def test_iso_timestamps_are_converted_to_san_francisco(given, stored):
    event = parse_event(start_body(start_time_local=given), EventKind.START)
    assert event.attributes["start_time_local"] == stored


def test_float_from_json_is_exact_decimal():
    event = parse_event(b'{"trip_id":"a","end_time_local":"2023/01/23 06:49:34 AM","tip":30.40}', "end")
    assert event.attributes["tip"] == Decimal("30.4")
    assert str(event.attributes["tip"]) == "30.4"


def test_python_float_is_converted_through_repr():
    event = parse_event(end_body(tip=0.1 + 0.2), EventKind.END)
    assert event.attributes["tip"] == Decimal("0.30000000000000004")


def test_thousands_separators_are_numbers():
    event = parse_event(end_body(trip_distance_meters="2,735.8848"), EventKind.END)
    assert event.attributes["trip_distance_meters"] == Decimal("2735.8848")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"trip_id": NaN}', "number_not_finite"),
        (
            b'{"trip_id": "a", "start_time_local": "2023/01/23 06:37:21 AM", "tip": Infinity}',
            "number_not_finite",
        ),
        (b"[1, 2]", "body_not_object"),
        (b'"text"', "body_not_object"),
        (b"\xff\xfe", "body_not_utf8"),
        (b"{not json", "body_not_json"),
        (b"", "body_not_json"),
    ],
)
def test_bad_bodies_are_rejected(body, reason):
    assert reasons_of(body) == (reason,)


def test_oversized_body_is_rejected():
    body = b'{"trip_id":"' + b"a" * MAX_EVENT_BYTES + b'"}'
    assert reasons_of(body) == ("body_too_large",)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"trip_id": None}, "trip_id_missing"),
        ({"trip_id": "   "}, "trip_id_empty"),
        ({"trip_id": 42}, "wrong_type"),
        ({"trip_id": "a\nb"}, "trip_id_invalid"),
        ({"start_time_local": "yesterday"}, "timestamp_invalid"),
        ({"start_time_local": None}, "timestamp_missing"),
        ({"start_time_local": 1700000000}, "wrong_type"),
        ({"upfront_pricing": -1}, "money_negative"),
        ({"pickup_location_latitude": 91}, "coordinate_out_of_range"),
        ({"pickup_location_longitude": -180.5}, "coordinate_out_of_range"),
        ({"pickup_location_latitude": "north"}, "number_invalid"),
        ({"pickup_location_latitude": True}, "wrong_type"),
        ({"upfront_pricing": "1" * 39}, "number_out_of_range"),
        ({"hail_type": ["street"]}, "wrong_type"),
        ({"hail_type": "x" * 300}, "text_too_long"),
        ({"event_version": -1}, "version_invalid"),
        ({"event_version": 1.5}, "version_invalid"),
    ],
)
def test_invalid_start_fields_have_reason(fields, reason):
    body = start_body()
    body.update(fields)
    assert reason in reasons_of(body)


def test_every_problem_is_reported():
    body = {"trip_id": "", "start_time_local": "bad", "upfront_pricing": -3}
    assert reasons_of(body) == ("trip_id_empty", "timestamp_invalid", "money_negative")


def test_missing_trip_id_key_is_reported():
    assert reasons_of({"start_time_local": "2023/01/23 06:37:21 AM"}) == ("trip_id_missing",)


def test_end_event_checks_money_and_counts():
    assert reasons_of(end_body(tip=-0.5), EventKind.END) == ("money_negative",)
    assert reasons_of(end_body(fare_time_milliseconds="1.5"), EventKind.END) == ("number_invalid",)
    assert reasons_of(end_body(trip_distance_meters=-1), EventKind.END) == ("value_negative",)


def test_unknown_fields_are_ignored_and_named():
    event = parse_event(start_body(status="x", **{"a.b": 1}), EventKind.START)
    assert event.ignored_fields == ("a.b", "status")
    assert "status" not in event.attributes


def test_null_zero_and_placeholder_are_distinct():
    event = parse_event(end_body(tip=0.0, tolls=None, qa_flags=""), EventKind.END)
    assert event.attributes["tip"] == Decimal(0)
    assert event.attributes["tolls"] is None
    assert event.attributes["qa_flags"] is None


def test_kind_is_inferred_from_timestamp_field():
    assert infer_kind(start_body()) is EventKind.START
    assert infer_kind(end_body()) is EventKind.END
    with pytest.raises(InvalidEventError) as caught:
        infer_kind({"trip_id": "a"})
    assert caught.value.reason == "event_kind_unknown"


def test_same_content_gives_same_digest():
    first = parse_event(end_body(tip=30.4), EventKind.END)
    second = parse_event(
        b'{"tip": 30.40, "end_time_local": "2023-01-23T06:49:34", "trip_id": "trip-1"}', "end"
    )
    assert first.digest == second.digest


def test_revision_orders_versions_numerically():
    assert revision_of(9, "f" * 64) < revision_of(10, "0" * 64)
    assert parse_event(end_body(event_version=3), EventKind.END).version == 3


def test_event_json_round_trip_is_lossless():
    event = parse_event(end_body(tip=30.40, trip_distance_meters="2,735.8848", qa_flags="LP-"), EventKind.END)
    assert event_from_json(event_to_json(event)) == event


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"upfront_pricing": "1E+1000000"}, "number_out_of_range"),
        ({"event_version": "1e999999999"}, "version_invalid"),
        ({"trip_id": "p\ud800"}, "trip_id_invalid"),
        ({"trip_id": "p\ufffe"}, "trip_id_invalid"),
        ({"hail_type": "street\ud800"}, "text_invalid"),
        ({"start_time_local": "0001-01-01T00:00:00+00:00"}, "timestamp_invalid"),
        ({"start_time_local": "9999-12-31T23:00:00-12:00"}, "timestamp_invalid"),
    ],
)
def test_extreme_values_are_rejected_not_raised(fields, reason):
    body = start_body()
    body.update(fields)
    assert reason in reasons_of(body)


def test_time_in_spring_forward_gap_moves_forward():
    local = parse_event(start_body(start_time_local="2023-03-12T02:30:00"), EventKind.START)
    utc = parse_event(start_body(start_time_local="2023-03-12T10:30:00Z"), EventKind.START)
    assert local.attributes["start_time_local"] == "2023-03-12T03:30:00-07:00"
    assert local.digest == utc.digest
