"""The two stream handlers, invoked directly against the local AWS endpoint.

Each test gets its own trip table, retry queue and invalid-event topic. The
topic has an SQS subscriber with raw message delivery, so notification
attributes arrive as SQS message attributes. Tests assert the exact partial
batch response, the items in the table and the messages on both queues.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import ClientError

from taxi_pipeline.envelope import open_message
from taxi_pipeline.events import EventKind, parse_event
from taxi_pipeline.stream import MAX_NOTIFICATION_PAYLOAD_BYTES, create_lambda_handler
from tests.factories import (
    ARRIVAL_TIMESTAMP,
    FUNCTION_NAMES,
    SHARD_ID,
    encode_body,
    kinesis_event,
    kinesis_record,
    lambda_context,
    load_handler_module,
    sample_event,
    sample_rows,
    sequence_number,
    stream_arn,
)
from tests.trip_model import model_final, natural_order

pytestmark = pytest.mark.endpoint

_deserializer = TypeDeserializer()

NO_FAILURES = {"batchItemFailures": []}
START_TIME = "2023/01/23 06:37:21 AM"
END_TIME = "2023/01/23 06:49:34 AM"


# --- Resources ------------------------------------------------------------------


@dataclass(frozen=True)
class InvalidTopic:
    """The invalid-event topic and the SQS queue subscribed to it."""

    arn: str
    subscriber_url: str


@pytest.fixture
def retry_queue(make_queue) -> str:
    return make_queue(prefix="retry").url


@pytest.fixture
def invalid_topic(sns, sqs, make_queue):
    topic_arn = sns.create_topic(Name=f"invalid-trips-{uuid.uuid4().hex[:12]}")["TopicArn"]
    subscriber_url = make_queue(prefix="invalid-subscriber").url
    subscriber_arn = sqs.get_queue_attributes(QueueUrl=subscriber_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=subscriber_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    yield InvalidTopic(topic_arn, subscriber_url)
    sns.delete_topic(TopicArn=topic_arn)


@pytest.fixture
def function_env(monkeypatch, endpoint_url, trip_table, retry_queue, invalid_topic):
    """Set the functions' environment. Tests change single variables with monkeypatch."""
    environment = {
        "TABLE_NAME": trip_table,
        "INVALID_TOPIC_ARN": invalid_topic.arn,
        "RETRY_QUEUE_URL": retry_queue,
        "POWERTOOLS_METRICS_NAMESPACE": "TaxiPipelineTest",
        # A service name per test gives the Powertools Logger a handler bound
        # to this test's captured stdout.
        "POWERTOOLS_SERVICE_NAME": f"stream-test-{uuid.uuid4().hex[:8]}",
        "AWS_MAX_ATTEMPTS": "2",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def invoke(kind: EventKind, event: dict) -> dict:
    """Invoke the handler of ``kind`` from a freshly imported module, as in a new container."""
    handler = load_handler_module(kind).lambda_handler
    return handler(event, lambda_context(kind))


# --- Reading results ------------------------------------------------------------


def table_items(dynamodb, table: str) -> dict[str, dict]:
    items: dict[str, dict] = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        for item in page["Items"]:
            decoded = {name: _deserializer.deserialize(value) for name, value in item.items()}
            items[decoded["trip_id"]] = decoded
    return items


@dataclass(frozen=True)
class ReceivedMessage:
    body: str
    attributes: dict[str, str]


def receive_messages(sqs, queue_url: str, expected: int, timeout: float = 10.0) -> list[ReceivedMessage]:
    """Receive until ``expected`` messages arrived, then check for one second that no more come."""
    messages: list[ReceivedMessage] = []
    deadline = time.monotonic() + timeout
    while len(messages) < expected and time.monotonic() < deadline:
        messages += _receive_batch(sqs, queue_url, wait_seconds=1)
    messages += _receive_batch(sqs, queue_url, wait_seconds=1)
    return messages


def _receive_batch(sqs, queue_url: str, wait_seconds: int) -> list[ReceivedMessage]:
    response = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=wait_seconds,
        MessageAttributeNames=["All"],
        VisibilityTimeout=300,
    )
    return [
        ReceivedMessage(
            body=message["Body"],
            attributes={
                name: value["StringValue"] for name, value in message.get("MessageAttributes", {}).items()
            },
        )
        for message in response.get("Messages", [])
    ]


def metric_values(output: str) -> dict[str, float]:
    """Sum the metrics of the EMF lines that Powertools Metrics printed."""
    values: dict[str, float] = {}
    for line in output.splitlines():
        if not line.startswith('{"_aws"'):
            continue
        document = json.loads(line)
        for directive in document["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                name = metric["Name"]
                values[name] = values.get(name, 0) + sum(document[name])
    return values


def batch_log_lines(output: str) -> list[dict]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{"level"')]
    return [line for line in lines if line["message"].startswith("Processed Kinesis batch")]


def failures(*offsets: int) -> dict:
    return {"batchItemFailures": [{"itemIdentifier": sequence_number(offset)} for offset in offsets]}


def start_body(trip_id: str, **fields) -> dict:
    return {"trip_id": trip_id, "start_time_local": START_TIME, **fields}


def end_body(trip_id: str, **fields) -> dict:
    return {"trip_id": trip_id, "end_time_local": END_TIME, **fields}


def expected_item(*events) -> dict:
    return model_final(natural_order(list(events)))


def notification_attributes(kind: EventKind, offset: int, reason: str, payload: bytes, encoding: str):
    return {
        "reason": reason,
        "event_kind": kind.value,
        "stream": stream_arn(kind),
        "sequence_number": sequence_number(offset),
        "shard_id": SHARD_ID,
        "encoding": encoding,
        "payload_truncated": "false",
        "payload_bytes": str(len(payload)),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }


# --- All valid ------------------------------------------------------------------


def test_sample_trips_are_all_written(
    function_env, sample_dir, dynamodb, sqs, trip_table, retry_queue, invalid_topic, capsys
):
    # GIVEN the 200 real start events and the 200 real end events
    starts = sample_rows(sample_dir, EventKind.START)
    ends = sample_rows(sample_dir, EventKind.END)

    # WHEN each stream's batch reaches its function
    start_response = invoke(EventKind.START, sample_event(sample_dir, EventKind.START))
    end_response = invoke(EventKind.END, sample_event(sample_dir, EventKind.END))

    # THEN nothing is retried and every trip is in the table as the write rules define
    assert start_response == NO_FAILURES
    assert end_response == NO_FAILURES
    items = table_items(dynamodb, trip_table)
    ends_by_trip = {row["trip_id"]: row for row in ends}
    assert len(items) == 200
    for row in starts:
        start_event = parse_event(row, EventKind.START)
        end_event = parse_event(ends_by_trip[row["trip_id"]], EventKind.END)
        assert items[row["trip_id"]] == expected_item(start_event, end_event)

    # AND no message went to the retry queue or the topic
    assert receive_messages(sqs, retry_queue, expected=0) == []
    assert receive_messages(sqs, invalid_topic.subscriber_url, expected=0) == []

    # AND both invocations published their counts and logged one summary line each
    output = capsys.readouterr().out
    metrics = metric_values(output)
    assert metrics["EventsValid"] == 400
    assert metrics["EventsWritten"] == 400
    assert metrics["EventsInvalid"] == 0
    assert metrics["RecordsFailed"] == 0
    assert len(batch_log_lines(output)) == 2
    driver_ids = {row["driver_id"] for row in starts if row["driver_id"] not in (None, "-")}
    assert not [driver_id for driver_id in driver_ids if f'"{driver_id}"' in output]


# --- Invalid events -------------------------------------------------------------


def test_invalid_events_are_published_with_attributes(
    function_env, dynamodb, sqs, trip_table, retry_queue, invalid_topic, capsys
):
    # GIVEN one batch of valid events and each kind of invalid event
    huge = b'{"trip_id": "' + b"x" * (1024 * 1024) + b'"}'
    bodies: list[Any] = [
        start_body("valid-1", hail_type="street"),
        b"\xff\xfe not UTF-8",
        b"not json",
        b'["an", "array"]',
        b'{"trip_id": "nan-1", "start_time_local": "2023/01/23", "upfront_pricing": NaN}',
        {"start_time_local": START_TIME},
        {"trip_id": "   ", "start_time_local": START_TIME},
        {"trip_id": "types-1", "start_time_local": START_TIME, "upfront_pricing": "lots"},
        end_body("wrong-stream-1"),
        huge,
        b"",
        {"trip_id": 5, "start_time_local": START_TIME},
        b"control \x01 character",
        start_body("valid-2"),
    ]
    event = kinesis_event(bodies, EventKind.START)
    event["Records"].append(
        kinesis_record(start_body("b64"), EventKind.START, sequence_number(14), data="abc")
    )

    # WHEN the batch is handled
    response = invoke(EventKind.START, event)

    # THEN nothing is retried and only the valid events are in the table
    assert response == NO_FAILURES
    assert sorted(table_items(dynamodb, trip_table)) == ["valid-1", "valid-2"]
    assert receive_messages(sqs, retry_queue, expected=0) == []

    # AND each invalid record is on the topic with its reason and payload
    expected_reasons = {
        1: "body_not_utf8",
        2: "body_not_json",
        3: "body_not_object",
        4: "number_not_finite",
        5: "trip_id_missing",
        6: "trip_id_empty",
        7: "number_invalid",
        8: "timestamp_missing",
        9: "body_too_large",
        10: "body_not_json",
        11: "wrong_type",
        12: "body_not_json",
        14: "data_not_base64",
    }
    messages = receive_messages(sqs, invalid_topic.subscriber_url, expected=len(expected_reasons))
    by_offset = {
        int(message.attributes["sequence_number"]) - int(sequence_number(0)): message for message in messages
    }
    assert sorted(by_offset) == sorted(expected_reasons)
    assert len(messages) == len(expected_reasons)

    for offset, reason in expected_reasons.items():
        message = by_offset[offset]
        assert message.attributes["reason"] == reason, offset
        if offset in (1, 9, 10, 12, 14):
            continue
        payload = encode_body(bodies[offset])
        assert message.body == payload.decode("utf-8")
        assert message.attributes == notification_attributes(EventKind.START, offset, reason, payload, "text")

    # AND a payload that is not UTF-8 arrives as base64
    not_utf8 = by_offset[1]
    assert not_utf8.attributes["encoding"] == "base64"
    assert base64.b64decode(not_utf8.body) == b"\xff\xfe not UTF-8"

    # AND a payload with a control character arrives as base64, since SQS rejects it as text
    control = by_offset[12]
    assert control.attributes == notification_attributes(
        EventKind.START, 12, "body_not_json", bodies[12], "base64"
    )
    assert base64.b64decode(control.body) == bodies[12]

    # AND the 1 MiB payload is cut to its first bytes, with the size and digest of the whole
    truncated = by_offset[9]
    assert truncated.attributes["payload_truncated"] == "true"
    assert truncated.attributes["payload_bytes"] == str(len(huge))
    assert truncated.attributes["payload_sha256"] == hashlib.sha256(huge).hexdigest()
    assert truncated.body.encode() == huge[:MAX_NOTIFICATION_PAYLOAD_BYTES]

    # AND an empty payload gets a placeholder body, since SNS rejects an empty message
    empty = by_offset[10]
    assert empty.body == "(empty)"
    assert empty.attributes["encoding"] == "empty"
    assert empty.attributes["payload_bytes"] == "0"

    # AND data that is not base64 is published as received
    assert by_offset[14].body == "abc"

    metrics = metric_values(capsys.readouterr().out)
    assert metrics["EventsInvalid"] == 13
    assert metrics["EventsValid"] == 2


# --- Write failures -------------------------------------------------------------


def test_missing_table_sends_events_for_replay(
    function_env, monkeypatch, sqs, retry_queue, invalid_topic, capsys
):
    # GIVEN a function whose table does not exist
    monkeypatch.setenv("TABLE_NAME", f"missing-{uuid.uuid4().hex[:8]}")
    bodies = [
        end_body("r-1", tip=1.5),
        b"not json",
        end_body("r-2", tolls=0.0),
        end_body("r-1", tip=2),
    ]
    event = kinesis_event(bodies, EventKind.END)

    # WHEN the batch is handled
    response = invoke(EventKind.END, event)

    # THEN nothing is retried, every valid event is on the retry queue, the invalid one on the topic
    assert response == NO_FAILURES
    envelopes = receive_messages(sqs, retry_queue, expected=3)
    assert len(envelopes) == 3
    by_sequence = {json.loads(message.body)["source"]["sequence_number"]: message for message in envelopes}
    assert sorted(by_sequence) == [sequence_number(0), sequence_number(2), sequence_number(3)]

    for offset in (0, 2, 3):
        body = by_sequence[sequence_number(offset)].body
        envelope = json.loads(body)
        assert envelope["envelope_version"] == 1
        assert envelope["event_kind"] == "end"
        assert envelope["event"] == encode_body(bodies[offset]).decode()
        assert envelope["error"]["class"] == "RetryableWriteError"
        assert envelope["error"]["reason"] == "table_not_found"
        assert envelope["error"]["code"] == "ResourceNotFoundException"
        assert envelope["source"] == {
            "stream_arn": stream_arn(EventKind.END),
            "shard_id": SHARD_ID,
            "sequence_number": sequence_number(offset),
            "event_id": f"{SHARD_ID}:{sequence_number(offset)}",
            "approximate_arrival_timestamp": ARRIVAL_TIMESTAMP,
        }
        assert envelope["function_name"] == FUNCTION_NAMES[EventKind.END]
        assert open_message(body).parse() == parse_event(bodies[offset], EventKind.END)

    published = receive_messages(sqs, invalid_topic.subscriber_url, expected=1)
    assert [message.attributes["sequence_number"] for message in published] == [sequence_number(1)]

    metrics = metric_values(capsys.readouterr().out)
    assert metrics["EventsWriteFailed"] == 3
    assert metrics["EventsSentForReplay"] == 3


def test_oversized_item_goes_to_retry_queue(function_env, dynamodb, sqs, trip_table, retry_queue):
    # GIVEN a table that rejects one trip's item as too large, as DynamoDB does over 400 KB
    table = ItemTooLargeTable(dynamodb, too_large_trip="big-1")
    handler = create_lambda_handler(EventKind.END, dynamodb_client=table)
    event = kinesis_event([end_body("big-1", tip=1), end_body("ok-1", tip=2)], EventKind.END)

    # WHEN the batch is handled
    response = handler(event, lambda_context(EventKind.END))

    # THEN the other trip is written and the large one waits on the retry queue
    assert response == NO_FAILURES
    assert sorted(table_items(dynamodb, trip_table)) == ["ok-1"]
    envelopes = receive_messages(sqs, retry_queue, expected=1)
    assert len(envelopes) == 1
    error = json.loads(envelopes[0].body)["error"]
    assert error["class"] == "PermanentWriteError"
    assert error["reason"] == "item_too_large"


class ItemTooLargeTable:
    """A DynamoDB client that rejects one trip's update as too large and passes the others on."""

    def __init__(self, client, too_large_trip: str) -> None:
        self.client = client
        self.too_large_trip = too_large_trip

    def update_item(self, **request):
        if request["Key"]["trip_id"]["S"] == self.too_large_trip:
            raise ClientError(
                {
                    "Error": {
                        "Code": "ValidationException",
                        "Message": "Item size has exceeded the maximum allowed size",
                    },
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "UpdateItem",
            )
        return self.client.update_item(**request)


# --- Destinations unavailable ---------------------------------------------------


def test_retry_queue_unavailable_reports_failed_writes(
    function_env, monkeypatch, sqs, retry_queue, invalid_topic, endpoint_url
):
    # GIVEN a missing table and a retry queue URL that names no queue
    monkeypatch.setenv("TABLE_NAME", f"missing-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("RETRY_QUEUE_URL", f"{endpoint_url}/000000000000/no-such-queue-{uuid.uuid4().hex[:8]}")
    bodies = [start_body("q-1"), b"not json", start_body("q-2")]

    # WHEN the batch is handled
    response = invoke(EventKind.START, kinesis_event(bodies, EventKind.START))

    # THEN the valid events are reported for redelivery and the invalid one is not
    assert response == failures(0, 2)
    published = receive_messages(sqs, invalid_topic.subscriber_url, expected=1)
    assert [message.attributes["sequence_number"] for message in published] == [sequence_number(1)]


def test_topic_unavailable_reports_invalid_records(
    function_env, monkeypatch, dynamodb, sqs, trip_table, retry_queue
):
    # GIVEN a topic ARN that names no topic
    monkeypatch.setenv(
        "INVALID_TOPIC_ARN",
        f"arn:aws:sns:us-east-1:000000000000:no-such-topic-{uuid.uuid4().hex[:8]}",
    )
    bodies = [b"not json", start_body("t-1"), {"trip_id": ""}, start_body("t-2")]

    # WHEN the batch is handled
    response = invoke(EventKind.START, kinesis_event(bodies, EventKind.START))

    # THEN the invalid records are reported for redelivery and the valid ones are written
    assert response == failures(0, 2)
    assert sorted(table_items(dynamodb, trip_table)) == ["t-1", "t-2"]
    assert receive_messages(sqs, retry_queue, expected=0) == []


class PartiallyFailingClient:
    """Wraps a real SNS or SQS client and fails the batch entries whose Id is in ``failed_ids``.

    A failed entry is not sent and comes back under ``Failed``, as when the
    service rejects one entry of a batch call.
    """

    def __init__(self, client, failed_ids: set[str]) -> None:
        self.client = client
        self.failed_ids = failed_ids

    def publish_batch(self, **request):
        return self._call(self.client.publish_batch, request, "PublishBatchRequestEntries")

    def send_message_batch(self, **request):
        return self._call(self.client.send_message_batch, request, "Entries")

    def _call(self, operation, request, entries_key):
        entries = request[entries_key]
        kept = [entry for entry in entries if entry["Id"] not in self.failed_ids]
        response = dict(operation(**{**request, entries_key: kept})) if kept else {"Successful": []}
        response["Failed"] = list(response.get("Failed", [])) + [
            {
                "Id": entry["Id"],
                "SenderFault": False,
                "Code": "InternalError",
                "Message": "injected",
            }
            for entry in entries
            if entry["Id"] in self.failed_ids
        ]
        return response


def test_partial_publish_failure_reports_one_record(function_env, sns, sqs, invalid_topic):
    # GIVEN a topic that fails the entry of the record at position 1
    handler = create_lambda_handler(EventKind.START, sns_client=PartiallyFailingClient(sns, failed_ids={"1"}))
    event = kinesis_event([b"bad-0", b"bad-1", b"bad-2"], EventKind.START)

    # WHEN the batch is handled
    response = handler(event, lambda_context(EventKind.START))

    # THEN only that record is reported, and the others are on the topic
    assert response == failures(1)
    published = receive_messages(sqs, invalid_topic.subscriber_url, expected=2)
    assert sorted(message.body for message in published) == ["bad-0", "bad-2"]


def test_partial_send_failure_reports_one_record(function_env, monkeypatch, sqs, retry_queue):
    # GIVEN a missing table and a retry queue that fails the entry of the record at position 0
    monkeypatch.setenv("TABLE_NAME", f"missing-{uuid.uuid4().hex[:8]}")
    handler = create_lambda_handler(EventKind.END, sqs_client=PartiallyFailingClient(sqs, failed_ids={"0"}))
    event = kinesis_event([end_body("p-0"), end_body("p-1")], EventKind.END)

    # WHEN the batch is handled
    response = handler(event, lambda_context(EventKind.END))

    # THEN only that record is reported, and the other one is on the retry queue
    assert response == failures(0)
    envelopes = receive_messages(sqs, retry_queue, expected=1)
    assert [json.loads(message.body)["source"]["sequence_number"] for message in envelopes] == [
        sequence_number(1)
    ]


# --- Duplicates and order -------------------------------------------------------


def test_duplicate_delivery_keeps_table_state(function_env, dynamodb, sqs, trip_table, invalid_topic, capsys):
    # GIVEN a batch with one record twice, and an invalid record
    first = kinesis_record(start_body("dup-1", hail_type="street"), EventKind.START, sequence_number(0))
    invalid = kinesis_record(b"not json", EventKind.START, sequence_number(1))
    other = kinesis_record(start_body("dup-2"), EventKind.START, sequence_number(2))
    event = {"Records": [first, dict(first), invalid, other]}

    # WHEN the batch is handled, and then delivered again whole
    first_response = invoke(EventKind.START, event)
    items_after_first = table_items(dynamodb, trip_table)
    second_response = invoke(EventKind.START, json.loads(json.dumps(event)))

    # THEN the table is the same after both deliveries
    assert first_response == NO_FAILURES
    assert second_response == NO_FAILURES
    assert table_items(dynamodb, trip_table) == items_after_first
    assert items_after_first["dup-1"] == expected_item(
        parse_event(start_body("dup-1", hail_type="street"), EventKind.START)
    )

    # AND the topic got one notification per delivery, with the same stream and sequence number
    published = receive_messages(sqs, invalid_topic.subscriber_url, expected=2)
    assert [(m.attributes["stream"], m.attributes["sequence_number"]) for m in published] == [
        (stream_arn(EventKind.START), sequence_number(1))
    ] * 2

    # AND the repeats count as duplicates
    metrics = metric_values(capsys.readouterr().out)
    assert metrics["EventsWritten"] == 2
    assert metrics["EventsDuplicate"] == 4


def test_end_before_start_gives_ended_trip(function_env, dynamodb, trip_table):
    # GIVEN a trip whose end event is processed before its start event
    end = end_body("late-start-1", tip=3.25, fare_type="meter")
    start = start_body("late-start-1", hail_type="dispatch")

    # WHEN the end function and then the start function handle them
    end_response = invoke(EventKind.END, kinesis_event([end], EventKind.END))
    start_response = invoke(EventKind.START, kinesis_event([start], EventKind.START, first_offset=1))

    # THEN the trip is ended and has the attributes of both events
    assert end_response == NO_FAILURES
    assert start_response == NO_FAILURES
    item = table_items(dynamodb, trip_table)["late-start-1"]
    assert item["trip_status"] == "ended"
    assert item == expected_item(parse_event(end, EventKind.END), parse_event(start, EventKind.START))


def test_trip_versions_keep_newest(function_env, dynamodb, trip_table, capsys):
    # GIVEN three versions of one trip's end event, the newest in the middle
    bodies = [
        end_body("v-1", event_version=1, tip=1),
        end_body("v-1", event_version=3, tip=3),
        end_body("v-1", event_version=2, tip=2),
    ]

    # WHEN the batch is handled
    response = invoke(EventKind.END, kinesis_event(bodies, EventKind.END))

    # THEN the newest version is stored and the older one after it counts as stale
    assert response == NO_FAILURES
    assert table_items(dynamodb, trip_table)["v-1"]["tip"] == 3
    metrics = metric_values(capsys.readouterr().out)
    assert metrics["EventsWritten"] == 2
    assert metrics["EventsStale"] == 1
