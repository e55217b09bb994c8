"""The replay job against the local endpoint: drains, failures, restarts, dry runs and backfills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from boto3.dynamodb.types import TypeDeserializer

from taxi_pipeline.envelope import build_envelope
from taxi_pipeline.errors import RetryableWriteError
from taxi_pipeline.events import EventKind, parse_event
from taxi_pipeline.replay import BackfillOptions, ReplayOptions, run_backfill, run_replay
from taxi_pipeline.replay.queue import VisibilityKeeper, delete_messages, queue_counts
from tests.trip_model import model_final, natural_order

pytestmark = [pytest.mark.endpoint, pytest.mark.spark]

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = {"wait_time_seconds": 1, "receive_threads": 2, "write_threads": 4, "parallelism": 2}
_deserializer = TypeDeserializer()


def start(trip_id: str, **fields) -> dict:
    return {"trip_id": trip_id, "start_time_local": "2023/01/23 06:37:21 AM", **fields}


def end(trip_id: str, **fields) -> dict:
    return {"trip_id": trip_id, "end_time_local": "2023/01/23 06:49:34 AM", **fields}


def wrap(body: dict, kind: EventKind) -> str:
    error = RetryableWriteError(body["trip_id"], "throttled", "Rate exceeded", code="ThrottlingException")
    source = {
        "stream_arn": "arn:aws:kinesis:us-east-1:000000000000:stream/end-trip-stream",
        "sequence_number": "1",
    }
    return build_envelope(kind, json.dumps(body), error, source, function_name="end-taxi-trips")


def send_all(sqs, queue_url: str, bodies: list[str]) -> None:
    for offset in range(0, len(bodies), 10):
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[offset : offset + 10])]
        response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        assert not response.get("Failed"), response["Failed"]


def scan_table(dynamodb, table: str) -> dict[str, dict]:
    items = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        for item in page["Items"]:
            plain = {name: _deserializer.deserialize(value) for name, value in item.items()}
            items[plain["trip_id"]] = plain
    return items


def drain(sqs, queue_url: str) -> list[dict]:
    messages = []
    while True:
        response = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        )
        batch = response.get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)
        delete_messages(sqs, queue_url, [message["ReceiptHandle"] for message in batch])


def visible_count(sqs, queue_url: str) -> int:
    return queue_counts(sqs, queue_url)["ApproximateNumberOfMessages"]


def test_drain_applies_mixed_queue_exactly(spark, sqs, dynamodb, trip_table, make_queue, aws_settings):
    # GIVEN duplicates, out-of-order events, reserved field names, poison messages and bare bodies
    queue = make_queue("retry", dead_letter=True)
    events = {
        "a": [start("a", hail_type="street"), end("a", tip=30.40)],
        "b": [end("b", event_version=2, tip=5), end("b", event_version=1, tip=9), start("b")],
        "c": [start("c", status="x", name="y", timestamp="z", **{"a.b-c": 1})],
    }
    bodies = [
        wrap(events["a"][1], EventKind.END),
        json.dumps(events["a"][1]),
        wrap(events["a"][0], EventKind.START),
        json.dumps(events["a"][0]),
        json.dumps(events["b"][0]),
        json.dumps(events["b"][1]),
        json.dumps(events["b"][2]),
        json.dumps(events["b"][0]),
        json.dumps(events["c"][0]),
        "not json at all",
        '{"trip_id": "p1", "end_time_local": "2023/01/23 06:49:34 AM", "tip": NaN}',
        json.dumps(end("", tip=1)),
        json.dumps(end("p2", tip=-3)),
    ]
    send_all(sqs, queue.url, bodies)

    # WHEN the job drains the queue
    report = run_replay(
        spark, ReplayOptions(queue_url=queue.url, table_name=trip_table, **FAST), aws_settings
    )

    # THEN the table contains exactly the model's items
    expected = {
        trip_id: model_final(natural_order([parse_event(body, None) for body in trip_events]))
        for trip_id, trip_events in events.items()
    }
    assert scan_table(dynamodb, trip_table) == expected
    assert "status" not in expected["c"]

    # AND the source queue is empty, and only the poison messages are dead-lettered, with reasons
    assert queue_counts(sqs, queue.url) == {
        "ApproximateNumberOfMessages": 0,
        "ApproximateNumberOfMessagesNotVisible": 0,
        "ApproximateNumberOfMessagesDelayed": 0,
    }
    letters = drain(sqs, queue.dead_letter_url)
    reasons = sorted(message["MessageAttributes"]["reason"]["StringValue"] for message in letters)
    assert reasons == ["body_not_json", "money_negative", "number_not_finite", "trip_id_empty"]
    assert {message["Body"] for message in letters} == set(bodies[-4:])

    # AND the report accounts for every message once
    summary = report.to_dict()
    assert summary["stop_reason"] == "queue drained"
    assert summary["counts"]["messages_received"] == len(bodies)
    # Within a wave the older version of "b" is written first, so both versions count as applied.
    assert summary["outcomes"] == {"applied": 6, "duplicate": 3, "dead_lettered": 4}
    assert summary["counts"]["messages_deleted"] == len(bodies)


def test_empty_queue_ends_at_once(spark, trip_table, make_queue, aws_settings):
    queue = make_queue("empty", dead_letter=True)
    report = run_replay(
        spark, ReplayOptions(queue_url=queue.url, table_name=trip_table, **FAST), aws_settings
    )

    summary = report.to_dict()
    assert summary["stop_reason"] == "queue drained"
    assert summary["waves"] == 0
    assert summary["outcomes"] == {}


def test_delete_with_stale_receipt_handle_is_reported(sqs, make_queue):
    queue = make_queue("stale")
    send_all(sqs, queue.url, [json.dumps(end("s1"))])
    handle = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=1)["Messages"][0]["ReceiptHandle"]

    deleted, failed = delete_messages(sqs, queue.url, [handle, "not-a-receipt-handle"])

    assert deleted == 1
    assert [entry["Id"] for entry in failed] == ["1"]


def test_failing_writes_stay_on_queue_and_run_ends(spark, sqs, make_queue, aws_settings):
    # GIVEN valid events and a table that does not exist, so every write fails as retryable
    queue = make_queue("failing", dead_letter=True)
    send_all(sqs, queue.url, [json.dumps(end(f"f{n}")) for n in range(5)])
    options = ReplayOptions(
        queue_url=queue.url, table_name="no_such_trip_table", retry_delay_seconds=60, **FAST
    )

    # WHEN the job runs
    report = run_replay(spark, options, aws_settings)

    # THEN it ends without retrying them in a loop, and they stay on the queue, hidden for the retry delay
    summary = report.to_dict()
    assert summary["stop_reason"] == "queue drained"
    assert summary["outcomes"] == {"retry_later": 5}
    assert summary["reasons"] == {"write_table_not_found": 5}
    counts = queue_counts(sqs, queue.url)
    assert (
        counts["ApproximateNumberOfMessages"],
        counts["ApproximateNumberOfMessagesNotVisible"],
    ) == (0, 5)
    assert drain(sqs, queue.dead_letter_url) == []


def test_dry_run_writes_and_deletes_nothing(spark, sqs, dynamodb, trip_table, make_queue, aws_settings):
    queue = make_queue("dry", dead_letter=True)
    send_all(sqs, queue.url, [json.dumps(end("d1")), json.dumps(end("d1")), "oops"])
    options = ReplayOptions(queue_url=queue.url, table_name=trip_table, dry_run=True, **FAST)

    summary = run_replay(spark, options, aws_settings).to_dict()

    assert summary["mode"] == "dry_run"
    assert summary["outcomes"] == {"would_apply": 2, "would_dead_letter": 1}
    assert summary["counts"]["distinct_events"] == 1
    assert scan_table(dynamodb, trip_table) == {}
    assert visible_count(sqs, queue.url) == 3


def test_visibility_keeper_extends_messages_in_work(sqs, make_queue):
    queue = make_queue("keeper")
    send_all(sqs, queue.url, [json.dumps(end("k1"))])
    message = sqs.receive_message(QueueUrl=queue.url, VisibilityTimeout=2)["Messages"][0]

    keeper = VisibilityKeeper(sqs, queue.url, timeout=6, margin=3)
    keeper.track(message["ReceiptHandle"], received_at=time.time() - 5)
    keeper.extend_due()

    time.sleep(3)
    assert keeper.extended == 1
    assert sqs.receive_message(QueueUrl=queue.url, WaitTimeSeconds=0).get("Messages") is None


def _job_command(queue_url: str, table: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "jobs" / "replay_failed_trips.py"),
        "--JOB_NAME",
        "replay-test",
        "--queue_url",
        queue_url,
        "--table_name",
        table,
        *extra,
    ]


def test_job_stopped_mid_wave_converges_on_rerun(sqs, dynamodb, trip_table, make_queue, endpoint_url):
    # GIVEN a queue of 400 events of 200 trips, each sent twice
    queue = make_queue("restart", dead_letter=True, max_receive_count=10)
    trips = [(end(f"r{n}", tip=n), start(f"r{n}")) for n in range(200)]
    bodies = [json.dumps(body) for pair in trips for body in pair]
    send_all(sqs, queue.url, bodies + bodies)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint_url, "PYSPARK_PYTHON": sys.executable}

    # WHEN the job is killed while its first wave is writing
    fast = [
        "--wait_time_seconds",
        "1",
        "--visibility_timeout",
        "5",
        "--wave_size",
        "200",
        "--write_threads",
        "2",
    ]
    process = subprocess.Popen(
        _job_command(queue.url, trip_table, *fast),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and dynamodb.scan(TableName=trip_table, Select="COUNT")["Count"] == 0:
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    partial = dynamodb.scan(TableName=trip_table, Select="COUNT")["Count"]
    assert 0 < partial < 200, "the job must be stopped while trips remain"

    # AND started again after the in-flight messages became visible
    time.sleep(6)
    rerun = subprocess.run(
        _job_command(queue.url, trip_table, *fast),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    # THEN every trip is there exactly once with the right fields, and the queue is empty
    items = scan_table(dynamodb, trip_table)
    assert len(items) == 200
    for n in range(200):
        assert items[f"r{n}"]["tip"] == Decimal(n)
        assert items[f"r{n}"]["trip_status"] == "ended"
    counts = queue_counts(sqs, queue.url)
    assert counts["ApproximateNumberOfMessages"] + counts["ApproximateNumberOfMessagesNotVisible"] == 0
    assert drain(sqs, queue.dead_letter_url) == []


def test_job_runs_with_required_arguments_only(sqs, trip_table, make_queue, endpoint_url, tmp_path):
    queue = make_queue("required", dead_letter=True)
    send_all(sqs, queue.url, [json.dumps(end("q1"))])
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint_url, "PYSPARK_PYTHON": sys.executable}

    result = subprocess.run(
        _job_command(queue.url, trip_table), env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "queue drained" in result.stdout
    assert "Glue's JVM classes are not available" in result.stderr


@pytest.fixture
def sample_rows(sample_dir):
    starts = pq.read_table(sample_dir / "start_taxi_trips_sample.parquet")
    ends = pq.read_table(sample_dir / "end_taxi_trips_sample.parquet")
    return starts, ends


def expected_from_rows(starts, ends) -> dict[str, dict]:
    events = [parse_event(row, EventKind.START) for row in starts.to_pylist()]
    events += [parse_event(row, EventKind.END) for row in ends.to_pylist()]
    by_trip: dict[str, list] = {}
    for event in events:
        by_trip.setdefault(event.trip_id, []).append(event)
    return {trip_id: model_final(natural_order(trip_events)) for trip_id, trip_events in by_trip.items()}


def test_backfill_real_sample_from_parquet(spark, dynamodb, trip_table, aws_settings, sample_rows, tmp_path):
    # GIVEN the real sample's two Parquet files in one folder
    starts, ends = sample_rows
    pq.write_table(starts, tmp_path / "start.parquet")
    pq.write_table(ends, tmp_path / "end.parquet")
    (tmp_path / "README.md").write_text("Not an event file: the backfill skips it.\n")

    # WHEN it is backfilled, twice
    options = BackfillOptions(source=str(tmp_path), table_name=trip_table, write_threads=8)
    first = run_backfill(spark, options, aws_settings).to_dict()
    second = run_backfill(spark, options, aws_settings).to_dict()

    # THEN all 200 trips are in the table, and the second run changes nothing
    assert first["outcomes"] == {"applied": 400}
    assert first["stop_reason"] == "source applied"
    assert "ignored_fields" not in first["counts"]
    assert second["outcomes"] == {"duplicate": 400}
    assert scan_table(dynamodb, trip_table) == expected_from_rows(starts, ends)


def test_backfill_json_lines_and_csv_report_bad_rows(spark, dynamodb, trip_table, aws_settings, tmp_path):
    lines = [json.dumps(start("j1", hail_type="street")), json.dumps(end("j1", tip=2.5)), "{broken"]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    table = pa.table(
        {
            "trip_id": ["c1", "c2"],
            "end_time_local": ["2023/01/23 06:49:34 AM", "2023/01/23 06:49:34 AM"],
            "trip_distance_meters": ["2,735.8848", "-4"],
        }
    )
    pacsv.write_csv(table, csv_dir / "ends.csv")

    jsonl = run_backfill(
        spark,
        BackfillOptions(
            source=str(tmp_path / "events.jsonl"),
            table_name=trip_table,
            rejects_path=str(tmp_path / "rej"),
        ),
        aws_settings,
    ).to_dict()
    csv = run_backfill(
        spark,
        BackfillOptions(source=str(csv_dir), table_name=trip_table, source_format="csv"),
        aws_settings,
    )

    assert jsonl["outcomes"] == {"applied": 2, "invalid": 1}
    assert jsonl["reasons"] == {"body_not_json": 1}
    assert jsonl["counts"]["rejects_written"] == 1
    assert csv.to_dict()["reasons"] == {"value_negative": 1}
    items = scan_table(dynamodb, trip_table)
    assert items["j1"]["tip"] == Decimal("2.5")
    assert items["c1"]["trip_distance_meters"] == Decimal("2735.8848")
    assert "c2" not in items


@pytest.mark.glue
def test_glue_context_is_used_where_available(spark):
    from taxi_pipeline.replay.session import glue_or_spark

    session, job = glue_or_spark("replay-glue-test", {"JOB_NAME": "replay-glue-test"})
    assert job is not None
    assert session is not None
    job.commit()


def test_message_limit_is_exact_across_tasks(spark, sqs, trip_table, make_queue, aws_settings):
    queue = make_queue("limit", dead_letter=True)
    send_all(sqs, queue.url, [json.dumps(end(f"l{n}")) for n in range(25)])
    options = ReplayOptions(queue_url=queue.url, table_name=trip_table, max_messages=7, **FAST)

    summary = run_replay(spark, options, aws_settings).to_dict()

    assert summary["stop_reason"] == "message limit reached"
    assert summary["counts"]["messages_received"] == 7
    assert summary["outcomes"] == {"applied": 7}
    assert visible_count(sqs, queue.url) == 18


def test_backfill_csv_files_with_different_headers(spark, dynamodb, trip_table, aws_settings, tmp_path):
    # GIVEN a start file and an end file with different CSV headers in one folder
    (tmp_path / "a_start.csv").write_text(
        "trip_id,start_time_local,vehicle_placard_number,driver_id,hail_type\n"
        't1,2023/01/23 06:37:21 AM,P-1,"D,1",street\n'
    )
    (tmp_path / "b_end.csv").write_text(
        "trip_id,end_time_local,fare_type,meter_fare_amount,tip\nt1,2023/01/23 06:49:34 AM,meter,30.40,5\n"
    )

    # WHEN they are backfilled
    summary = run_backfill(spark, BackfillOptions(source=str(tmp_path), table_name=trip_table), aws_settings)

    # THEN each row keeps its own column names
    assert summary.to_dict()["outcomes"] == {"applied": 2}
    item = scan_table(dynamodb, trip_table)["t1"]
    assert item["start_time_local"] == "2023-01-23T06:37:21-08:00"
    assert item["driver_id"] == "D,1"
    assert item["hail_type"] == "street"
    assert item["meter_fare_amount"] == Decimal("30.4")
    assert item["trip_status"] == "ended"


def test_backfill_skips_blank_json_lines(spark, trip_table, aws_settings, tmp_path):
    (tmp_path / "events.jsonl").write_text(json.dumps(end("b1")) + "\n\n   \n")
    summary = run_backfill(spark, BackfillOptions(source=str(tmp_path), table_name=trip_table), aws_settings)
    assert summary.to_dict()["outcomes"] == {"applied": 1}
    assert summary.to_dict()["counts"]["blank_lines_skipped"] == 2


def test_unparseable_values_are_dead_lettered_not_fatal(
    spark, sqs, dynamodb, trip_table, make_queue, aws_settings
):
    queue = make_queue("extreme", dead_letter=True)
    bodies = [
        json.dumps(end("g1")),
        '{"trip_id": "x1", "end_time_local": "2023/01/23 06:49:34 AM", "tip": 1E+1000000}',
        '{"trip_id": "x2\\ud800", "end_time_local": "2023/01/23 06:49:34 AM"}',
        '{"trip_id": "x3", "end_time_local": "0001-01-01T00:00:00+00:00"}',
        json.dumps(end("g2")),
    ]
    send_all(sqs, queue.url, bodies)

    summary = run_replay(
        spark, ReplayOptions(queue_url=queue.url, table_name=trip_table, **FAST), aws_settings
    )

    assert summary.to_dict()["outcomes"] == {"applied": 2, "dead_lettered": 3}
    assert set(scan_table(dynamodb, trip_table)) == {"g1", "g2"}
    reasons = sorted(
        m["MessageAttributes"]["reason"]["StringValue"] for m in drain(sqs, queue.dead_letter_url)
    )
    assert reasons == ["number_out_of_range", "timestamp_invalid", "trip_id_invalid"]


def test_missing_dead_letter_queue_is_named(spark, sqs, trip_table, make_queue, aws_settings):
    queue = make_queue("nodlq")
    missing = queue.url.rsplit("/", 1)[0] + "/no-such-dead-letter-queue"
    options = ReplayOptions(queue_url=queue.url, table_name=trip_table, dead_letter_queue_url=missing, **FAST)
    with pytest.raises(ValueError, match="dead-letter queue .*no-such-dead-letter-queue"):
        run_replay(spark, options, aws_settings)


def test_message_received_again_keeps_newest_handle(sqs, make_queue):
    from taxi_pipeline.replay.queue import ReceiveQuota, receive_messages

    queue = make_queue("again")
    send_all(sqs, queue.url, [json.dumps(end("n1"))])
    quota = ReceiveQuota(
        max_messages=5, wait_time_seconds=1, visibility_timeout=1, threads=1, max_empty_polls=3
    )

    messages, counts = receive_messages(sqs, queue.url, quota)

    assert counts["received_twice"] >= 1
    deleted, failed = delete_messages(sqs, queue.url, [messages[0].receipt_handle])
    assert (deleted, failed) == (1, [])
