"""Unit tests of the parts of taxi_pipeline.stream that need no AWS endpoint.

Covered here: configuration, record parsing, per-trip grouping, the
invalid-event notification, the retry envelope entry and batch delivery.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import KinesisStreamRecord
from botocore.exceptions import ClientError, EndpointConnectionError

from taxi_pipeline.envelope import open_message
from taxi_pipeline.errors import InvalidEventError, RetryableWriteError
from taxi_pipeline.events import MAX_EVENT_BYTES, EventKind, Reason, parse_event
from taxi_pipeline.stream import (
    DATA_NOT_BASE64,
    MAX_BATCH_BYTES,
    MAX_NOTIFICATION_PAYLOAD_BYTES,
    REQUIRED_ENVIRONMENT,
    ConfigurationError,
    OutgoingEntry,
    RecordDeliveryError,
    RecordState,
    StreamConfig,
    build_notification_entry,
    build_notification_payload,
    build_retry_entry,
    deliver_in_batches,
    escape_for_sqs,
    group_by_trip,
    parse_record,
    shard_id_of,
    split_into_batches,
)
from tests.factories import (
    ARRIVAL_TIMESTAMP,
    SHARD_ID,
    kinesis_record,
    sequence_number,
    stream_arn,
)

START_BODY = {"trip_id": "trip-1", "start_time_local": "2023/01/23 06:37:21 AM"}
END_BODY = {"trip_id": "trip-1", "end_time_local": "2023/01/23 06:49:34 AM", "tip": 2.5}

FULL_ENVIRONMENT = {
    "TABLE_NAME": "taxi_trip_details",
    "INVALID_TOPIC_ARN": "arn:aws:sns:us-east-1:000000000000:Invalid-taxi-trips",
    "RETRY_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/000000000000/failed-updated-trips",
    "POWERTOOLS_METRICS_NAMESPACE": "TaxiPipeline",
}


def state_for(body, kind=EventKind.START, offset=0, **record_options) -> RecordState:
    record = kinesis_record(body, kind, sequence_number(offset), **record_options)
    return RecordState(offset, KinesisStreamRecord(record))


def parsed_state(body, kind=EventKind.START, offset=0, **record_options) -> RecordState:
    state = state_for(body, kind, offset, **record_options)
    parse_record(state, kind)
    return state


# --- Configuration --------------------------------------------------------------


def test_config_reads_every_variable():
    config = StreamConfig.from_env(FULL_ENVIRONMENT)

    assert config == StreamConfig(
        table_name="taxi_trip_details",
        invalid_topic_arn="arn:aws:sns:us-east-1:000000000000:Invalid-taxi-trips",
        retry_queue_url="https://sqs.us-east-1.amazonaws.com/000000000000/failed-updated-trips",
    )


@pytest.mark.parametrize("name", sorted(REQUIRED_ENVIRONMENT))
def test_config_missing_variable_is_named(name):
    environment = {key: value for key, value in FULL_ENVIRONMENT.items() if key != name}

    with pytest.raises(ConfigurationError) as caught:
        StreamConfig.from_env(environment)

    assert name in str(caught.value)
    for other in set(REQUIRED_ENVIRONMENT) - {name}:
        assert other not in str(caught.value)


def test_config_blank_variable_counts_as_missing():
    environment = {**FULL_ENVIRONMENT, "RETRY_QUEUE_URL": "  "}

    with pytest.raises(ConfigurationError, match="RETRY_QUEUE_URL"):
        StreamConfig.from_env(environment)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError) as caught:
        StreamConfig.from_env({})

    message = str(caught.value)
    for name in REQUIRED_ENVIRONMENT:
        assert name in message


# --- Parsing and grouping -------------------------------------------------------


def test_parse_record_keeps_valid_event():
    state = parsed_state(START_BODY)

    assert state.invalid is None
    assert state.event == parse_event(START_BODY, EventKind.START)
    assert state.payload == json.dumps(START_BODY, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not utf-8", Reason.BODY_NOT_UTF8),
        (b"not json", Reason.BODY_NOT_JSON),
        (b"", Reason.BODY_NOT_JSON),
        (b"[1, 2]", Reason.BODY_NOT_OBJECT),
        (
            b'{"trip_id": "t", "start_time_local": "2023/01/23 06:37:21 AM", "tip": NaN}',
            Reason.NUMBER_NOT_FINITE,
        ),
        ({"start_time_local": "2023/01/23 06:37:21 AM"}, Reason.TRIP_ID_MISSING),
        ({"trip_id": "  ", "start_time_local": "2023/01/23 06:37:21 AM"}, Reason.TRIP_ID_EMPTY),
        ({"trip_id": 17, "start_time_local": "2023/01/23 06:37:21 AM"}, Reason.WRONG_TYPE),
        ({"trip_id": "t", "start_time_local": "yesterday"}, Reason.TIMESTAMP_INVALID),
        ({"trip_id": "t", "end_time_local": "2023/01/23 06:49:34 AM"}, Reason.TIMESTAMP_MISSING),
        (b"{" + b" " * MAX_EVENT_BYTES + b"}", Reason.BODY_TOO_LARGE),
    ],
)
def test_parse_record_invalid_reason(body, reason):
    state = parsed_state(body)

    assert state.event is None
    assert state.invalid.reason == reason.value


def test_parse_record_data_not_base64():
    state = parsed_state(START_BODY, data="this is not base64!")

    assert state.event is None
    assert state.payload is None
    assert state.invalid.reason == DATA_NOT_BASE64


def test_group_by_trip_orders_by_sequence_number():
    # GIVEN records of two trips, one trip's records listed out of sequence order
    later = parsed_state({**START_BODY, "event_version": 2}, offset=5)
    earlier = parsed_state({**START_BODY, "event_version": 1}, offset=3)
    other = parsed_state({**START_BODY, "trip_id": "trip-2"}, offset=4)
    invalid = parsed_state(b"not json", offset=6)

    # WHEN they are grouped
    groups = group_by_trip([later, other, earlier, invalid])

    # THEN each trip's records are in sequence-number order and invalid ones are left out
    assert groups == [[earlier, later], [other]]


def test_group_by_trip_compares_numbers_not_text():
    short = RecordState(0, KinesisStreamRecord(kinesis_record(START_BODY, EventKind.START, "9")))
    long = RecordState(1, KinesisStreamRecord(kinesis_record(START_BODY, EventKind.START, "10")))
    for state in (short, long):
        parse_record(state, EventKind.START)

    assert group_by_trip([long, short]) == [[short, long]]


# --- Invalid-event notifications ------------------------------------------------


def test_notification_payload_text():
    payload = build_notification_payload(b'{"trip_id": "caf\xc3\xa9"')

    assert payload.body == '{"trip_id": "café"'
    assert payload.encoding == "text"
    assert payload.truncated is False
    assert payload.size == 19
    assert payload.sha256 == hashlib.sha256(b'{"trip_id": "caf\xc3\xa9"').hexdigest()


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe\x00binary", b"nul \x00 inside", "bad \ufffe character".encode()],
    ids=["not-utf8", "control-character", "noncharacter"],
)
def test_notification_payload_base64_fallback(payload):
    message = build_notification_payload(payload)

    assert message.encoding == "base64"
    assert base64.b64decode(message.body) == payload
    assert message.truncated is False
    assert message.size == len(payload)


def test_notification_payload_empty_has_placeholder():
    message = build_notification_payload(b"")

    assert message.body == "(empty)"
    assert message.encoding == "empty"
    assert message.size == 0
    assert message.sha256 == hashlib.sha256(b"").hexdigest()


def test_notification_payload_large_text_is_truncated():
    # GIVEN a 1 MiB text payload whose cut point falls inside a 2-byte character
    payload = b"a" + "é".encode() * (512 * 1024)

    message = build_notification_payload(payload)

    assert message.encoding == "text"
    assert message.truncated is True
    assert message.size == len(payload)
    assert message.sha256 == hashlib.sha256(payload).hexdigest()
    kept = message.body.encode("utf-8")
    assert payload.startswith(kept)
    assert MAX_NOTIFICATION_PAYLOAD_BYTES - 1 <= len(kept) <= MAX_NOTIFICATION_PAYLOAD_BYTES


def test_notification_payload_large_binary_keeps_first_bytes():
    payload = b"\xff" * (MAX_NOTIFICATION_PAYLOAD_BYTES + 1)

    message = build_notification_payload(payload)

    assert message.encoding == "base64"
    assert message.truncated is True
    assert base64.b64decode(message.body) == payload[:MAX_NOTIFICATION_PAYLOAD_BYTES]
    assert message.size == MAX_NOTIFICATION_PAYLOAD_BYTES + 1


def test_notification_payload_at_limit_is_whole():
    payload = b"x" * MAX_NOTIFICATION_PAYLOAD_BYTES

    message = build_notification_payload(payload)

    assert message.truncated is False
    assert message.body == payload.decode()


def test_notification_entry_has_every_attribute():
    state = parsed_state(b"not json", offset=7)

    entry = build_notification_entry(state, EventKind.START)

    assert entry.request == {
        "Id": "7",
        "Message": "not json",
        "MessageAttributes": {
            "reason": {"DataType": "String", "StringValue": "body_not_json"},
            "event_kind": {"DataType": "String", "StringValue": "start"},
            "stream": {"DataType": "String", "StringValue": stream_arn(EventKind.START)},
            "sequence_number": {"DataType": "String", "StringValue": sequence_number(7)},
            "shard_id": {"DataType": "String", "StringValue": SHARD_ID},
            "encoding": {"DataType": "String", "StringValue": "text"},
            "payload_truncated": {"DataType": "String", "StringValue": "false"},
            "payload_bytes": {"DataType": "Number", "StringValue": "8"},
            "payload_sha256": {
                "DataType": "String",
                "StringValue": hashlib.sha256(b"not json").hexdigest(),
            },
        },
    }
    assert len(entry.request["MessageAttributes"]) <= 10


def test_notification_entry_size_counts_body_and_attributes():
    state = parsed_state(b"not json")

    entry = build_notification_entry(state, EventKind.START)

    attributes = entry.request["MessageAttributes"]
    expected = len(b"not json") + sum(
        len(name) + len(value["DataType"]) + len(value["StringValue"]) for name, value in attributes.items()
    )
    assert entry.size == expected


def test_notification_entry_invalid_base64_data():
    state = parsed_state(START_BODY, data="@@not-base64@@")

    entry = build_notification_entry(state, EventKind.START)

    assert entry.request["Message"] == "@@not-base64@@"
    attributes = entry.request["MessageAttributes"]
    assert attributes["reason"]["StringValue"] == DATA_NOT_BASE64
    assert attributes["encoding"]["StringValue"] == "text"


def test_notification_entry_leaves_out_empty_attributes():
    record = kinesis_record(b"not json", EventKind.START, sequence_number(0))
    record["eventID"] = ""
    state = RecordState(0, KinesisStreamRecord(record))
    parse_record(state, EventKind.START)

    entry = build_notification_entry(state, EventKind.START)

    assert "shard_id" not in entry.request["MessageAttributes"]


def test_shard_id_comes_from_event_id():
    state = state_for(START_BODY, offset=2)

    assert shard_id_of(state.record) == SHARD_ID


# --- Retry envelopes ------------------------------------------------------------


def test_retry_entry_carries_event_and_source():
    # GIVEN a valid end event whose write failed
    state = parsed_state(END_BODY, EventKind.END, offset=3)
    state.write_error = RetryableWriteError(
        "trip-1", "throttled", "Rate exceeded", code="ThrottlingException"
    )

    # WHEN its retry-queue entry is built
    entry = build_retry_entry(state, EventKind.END, "end-taxi-trips")

    # THEN the envelope carries the event as received, the error and the source
    assert entry.request["Id"] == "3"
    envelope = json.loads(entry.request["MessageBody"])
    assert envelope["envelope_version"] == 1
    assert envelope["event_kind"] == "end"
    assert envelope["event"] == state.payload.decode()
    assert envelope["error"] == {
        "class": "RetryableWriteError",
        "reason": "throttled",
        "code": "ThrottlingException",
        "message": "trip trip-1: throttled: Rate exceeded",
    }
    assert envelope["source"] == {
        "stream_arn": stream_arn(EventKind.END),
        "shard_id": SHARD_ID,
        "sequence_number": sequence_number(3),
        "event_id": f"{SHARD_ID}:{sequence_number(3)}",
        "approximate_arrival_timestamp": ARRIVAL_TIMESTAMP,
    }
    assert envelope["function_name"] == "end-taxi-trips"
    assert entry.size == len(entry.request["MessageBody"].encode())


def test_retry_entry_opens_as_the_same_event():
    state = parsed_state(END_BODY, EventKind.END)
    state.write_error = RetryableWriteError("trip-1", "table_not_found", "no table")

    entry = build_retry_entry(state, EventKind.END, None)

    message = open_message(entry.request["MessageBody"])
    assert message.kind is EventKind.END
    assert message.parse() == state.event


def test_retry_entry_escapes_characters_sqs_rejects():
    body = '{"trip_id": "t\uffff", "end_time_local": "2023/01/23 06:49:34 AM"}'
    state = parsed_state(body.encode(), EventKind.END)
    state.write_error = RetryableWriteError("t\uffff", "throttled", "slow")

    entry = build_retry_entry(state, EventKind.END, "end-taxi-trips")

    message_body = entry.request["MessageBody"]
    assert "\uffff" not in message_body
    assert json.loads(message_body)["event"] == body


def test_escape_for_sqs_keeps_document_equal():
    document = json.dumps({"text": "a\ufffeb\uffffc", "plain": "é\u2028"}, ensure_ascii=False)

    escaped = escape_for_sqs(document)

    assert escaped == '{"text": "a\\ufffeb\\uffffc", "plain": "é\u2028"}'
    assert json.loads(escaped) == json.loads(document)


# --- Batch calls ----------------------------------------------------------------


def entries_of(sizes: list[int]) -> list[OutgoingEntry]:
    entries = []
    for position, size in enumerate(sizes):
        state = state_for(START_BODY, offset=position)
        entries.append(OutgoingEntry(state, {"Id": state.entry_id}, size))
    return entries


def test_split_into_batches_by_count():
    batches = split_into_batches(entries_of([10] * 25))

    assert [len(batch) for batch in batches] == [10, 10, 5]


def test_split_into_batches_by_size():
    third = MAX_BATCH_BYTES // 3

    batches = split_into_batches(entries_of([third, third, third, third + 1, 5]))

    assert [len(batch) for batch in batches] == [3, 2]


def test_split_into_batches_oversized_entry_alone():
    batches = split_into_batches(entries_of([10, MAX_BATCH_BYTES + 1, 10]))

    assert [len(batch) for batch in batches] == [1, 1, 1]


class RecordingSend:
    """A batch call that records its requests and returns a prepared response per call."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.calls: list[list[dict]] = []

    def __call__(self, batch):
        self.calls.append(batch)
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response


def successful(*ids):
    return {"Successful": [{"Id": entry_id, "MessageId": f"m-{entry_id}"} for entry_id in ids]}


def test_deliver_in_batches_all_successful():
    entries = entries_of([10] * 12)
    send = RecordingSend(successful(*map(str, range(10))), successful("10", "11"))

    failures = deliver_in_batches(entries, send, "retry queue")

    assert failures == []
    assert [len(call) for call in send.calls] == [10, 2]
    assert all(entry.state.failure is None for entry in entries)


def test_deliver_in_batches_marks_failed_entries():
    # GIVEN a response with one entry under Failed and one entry missing
    entries = entries_of([10, 10, 10])
    response = {
        "Successful": [{"Id": "0", "MessageId": "m-0"}],
        "Failed": [{"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "try again"}],
    }

    failures = deliver_in_batches(entries, RecordingSend(response), "retry queue")

    assert [(failure.sequence_number, failure.code) for failure in failures] == [
        (sequence_number(1), "InternalError"),
        (sequence_number(2), "MissingFromResponse"),
    ]
    assert entries[0].state.failure is None
    assert isinstance(entries[1].state.failure, RecordDeliveryError)
    assert entries[1].state.failure.destination == "retry queue"
    assert isinstance(entries[2].state.failure, RecordDeliveryError)


def test_deliver_failed_call_fails_own_entries():
    # GIVEN two calls, the first of which raises
    entries = entries_of([10] * 11)
    error = ClientError(
        {"Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue", "Message": "no queue"}},
        "SendMessageBatch",
    )
    send = RecordingSend(error, successful("10"))

    failures = deliver_in_batches(entries, send, "retry queue")

    assert len(failures) == 10
    assert {failure.code for failure in failures} == {"AWS.SimpleQueueService.NonExistentQueue"}
    assert [entry.state.failure is None for entry in entries] == [False] * 10 + [True]


def test_deliver_in_batches_network_error_fails_entries():
    entries = entries_of([10, 10])
    send = RecordingSend(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))

    failures = deliver_in_batches(entries, send, "invalid-event topic")

    assert [failure.code for failure in failures] == ["EndpointConnectionError"] * 2


def test_deliver_with_stubbed_sns_client():
    # GIVEN a real SNS client whose PublishBatch response lists one failed entry
    import boto3
    from botocore.stub import Stubber

    client = boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).client("sns")
    topic = "arn:aws:sns:us-east-1:000000000000:Invalid-taxi-trips"
    entries = [build_notification_entry(parsed_state(b"bad", offset=i), EventKind.START) for i in range(3)]
    stubber = Stubber(client)
    stubber.add_response(
        "publish_batch",
        {
            "Successful": [{"Id": "0", "MessageId": "m-0"}, {"Id": "2", "MessageId": "m-2"}],
            "Failed": [{"Id": "1", "Code": "KMSThrottling", "SenderFault": False}],
        },
        {"TopicArn": topic, "PublishBatchRequestEntries": [entry.request for entry in entries]},
    )

    # WHEN the entries are published
    with stubber:
        failures = deliver_in_batches(
            entries,
            lambda batch: client.publish_batch(TopicArn=topic, PublishBatchRequestEntries=batch),
            "invalid-event topic",
        )

    # THEN only the failed entry's record is marked
    stubber.assert_no_pending_responses()
    assert [failure.sequence_number for failure in failures] == [sequence_number(1)]
    assert failures[0].code == "KMSThrottling"


def test_data_not_base64_reason_listed():
    # "abc" is three base64 characters, which no padding can complete.
    state = parsed_state(START_BODY, data="abc")

    assert isinstance(state.invalid, InvalidEventError)
    assert state.invalid.reasons == (DATA_NOT_BASE64,)
