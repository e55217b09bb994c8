"""DataFrame tests of the replay job's pure steps: parse, split, collapse and order."""

from __future__ import annotations

import json

import pytest
from chispa import assert_df_equality
from pyspark.sql import Row

from taxi_pipeline.envelope import build_envelope
from taxi_pipeline.errors import RetryableWriteError
from taxi_pipeline.events import EventKind, parse_event
from taxi_pipeline.replay import steps

pytestmark = pytest.mark.spark

START = {"trip_id": "t1", "start_time_local": "2023/01/23 06:37:21 AM", "hail_type": "street"}
END = {"trip_id": "t1", "end_time_local": "2023/01/23 06:49:34 AM", "tip": 30.40}


def message(message_id: str, body: str) -> tuple:
    return (message_id, f"handle-{message_id}", body, 1, 0, 0.0)


def envelope(body: dict, kind: EventKind) -> str:
    error = RetryableWriteError(body["trip_id"], "throttled", "slow down")
    return build_envelope(kind, json.dumps(body), error, {"sequence_number": "1"})


@pytest.fixture
def messages(spark):
    rows = [
        message("m1", envelope(START, EventKind.START)),
        message("m2", json.dumps(END)),
        message("m3", json.dumps(END)),
        message("m4", "not json"),
        message("m5", json.dumps({"trip_id": "", "end_time_local": "2023/01/23 06:49:34 AM"})),
    ]
    return spark.createDataFrame(rows, steps.MESSAGE_SCHEMA)


def test_parse_keeps_message_and_adds_result(messages):
    parsed = steps.parse_messages(messages)
    assert parsed.columns == messages.columns + [field.name for field in steps.PARSED_SCHEMA]

    by_id = {row["message_id"]: row for row in parsed.collect()}
    assert by_id["m1"]["valid"] and by_id["m1"]["kind"] == "start"
    assert by_id["m2"]["valid"] and by_id["m2"]["kind"] == "end"
    assert by_id["m2"]["revision"] == parse_event(END, EventKind.END).revision
    assert (by_id["m4"]["valid"], by_id["m4"]["reason"]) == (False, "body_not_json")
    assert (by_id["m5"]["valid"], by_id["m5"]["reason"]) == (False, "trip_id_empty")


def test_split_valid_and_invalid(spark, messages):
    parsed = steps.parse_messages(messages)
    invalid = steps.invalid_events(parsed).select("message_id", "reason")
    expected = spark.createDataFrame(
        [("m4", "body_not_json"), ("m5", "trip_id_empty")], "message_id string, reason string"
    )
    assert_df_equality(invalid, expected, ignore_row_order=True, ignore_nullable=True)
    assert steps.valid_events(parsed).count() == 3


def test_collapse_merges_identical_events(spark, messages):
    valid = steps.valid_events(steps.parse_messages(messages))
    collapsed = steps.collapse_events(valid, ("message_id", "receipt_handle"))

    rows = {row["kind"]: row for row in collapsed.collect()}
    assert rows["end"]["copies"] == 2
    assert [m["message_id"] for m in rows["end"]["messages"]] == ["m2", "m3"]
    assert rows["start"]["copies"] == 1

    expected = spark.createDataFrame(
        [("t1", "end", 2), ("t1", "start", 1)], "trip_id string, kind string, copies long"
    )
    assert_df_equality(
        collapsed.select("trip_id", "kind", "copies"),
        expected,
        ignore_row_order=True,
        ignore_nullable=True,
    )


def test_order_puts_trip_in_one_partition_in_natural_order(spark):
    rows = [
        Row(trip_id=f"t{n % 7}", kind=kind, revision=f"{version:020d}:x", event_json="{}", copies=1)
        for n in range(40)
        for kind, version in (("end", n % 3), ("start", n % 2))
    ]
    events = spark.createDataFrame(rows).dropDuplicates(["trip_id", "kind", "revision"])
    ordered = steps.order_for_writes(events, 3)

    partitions = ordered.rdd.glom().collect()
    seen: dict[str, int] = {}
    for index, partition in enumerate(partitions):
        keys = [(row["trip_id"], row["kind"] == "end", row["revision"]) for row in partition]
        assert keys == sorted(keys)
        for row in partition:
            assert seen.setdefault(row["trip_id"], index) == index
    assert len(seen) == 7


def test_order_rejects_zero_partitions(spark):
    events = spark.createDataFrame([Row(trip_id="t", kind="end", revision="r")])
    with pytest.raises(ValueError, match="partitions"):
        steps.order_for_writes(events, 0)


def test_parse_records_accepts_parquet_floats(spark):
    records = spark.createDataFrame(
        [
            Row(
                trip_id="p1",
                end_time_local="2023/01/23 06:49:34 AM",
                tip=30.40,
                fare_time_milliseconds="2,081,284",
            )
        ]
    )
    parsed = steps.parse_records(records).collect()[0]
    assert parsed["valid"]
    event = json.loads(parsed["event_json"])
    assert event["attributes"]["tip"] == "30.4"
    assert event["attributes"]["fare_time_milliseconds"] == "2081284"


def test_parse_event_lines_reports_bad_lines(spark):
    lines = spark.createDataFrame([(json.dumps(START),), ("{broken",)], "body string")
    result = {row["valid"]: row["reason"] for row in steps.parse_event_lines(lines).collect()}
    assert result == {True: None, False: "body_not_json"}
