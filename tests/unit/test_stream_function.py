"""Unit tests of StreamFunction and the handler modules, with in-memory AWS clients.

The clients here record requests and return prepared responses, so these
tests check the batch logic (ordering, batching, failure reporting, metrics,
logging) without an endpoint. tests/functional/test_stream_handlers.py runs
the same handlers against the local endpoint.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
import uuid

import pytest
from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from taxi_pipeline.events import EventKind
from taxi_pipeline.stream import (
    ConfigurationError,
    StreamConfig,
    StreamFunction,
)
from tests.factories import (
    kinesis_event,
    kinesis_record,
    lambda_context,
    load_handler_module,
    sequence_number,
)

CONFIG = StreamConfig(
    table_name="taxi_trip_details",
    invalid_topic_arn="arn:aws:sns:us-east-1:000000000000:Invalid-taxi-trips",
    retry_queue_url="https://sqs.us-east-1.amazonaws.com/000000000000/failed-updated-trips",
)


def start_body(trip_id: str = "trip-1", version: int = 0, **fields) -> dict:
    return {
        "trip_id": trip_id,
        "start_time_local": "2023/01/23 06:37:21 AM",
        "event_version": version,
        "driver_id": "driver-secret-42",
        **fields,
    }


def client_error(code: str, message: str = "", status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Operation",
    )


class FakeDynamoDB:
    """An ``update_item`` that records requests and raises prepared errors by trip id."""

    def __init__(self, errors: dict[str, Exception] | None = None, jitter: float = 0.0) -> None:
        self.errors = errors or {}
        self.jitter = jitter
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def update_item(self, **request):
        if self.jitter:
            time.sleep(random.uniform(0, self.jitter))
        with self._lock:
            self.requests.append(request)
        error = self.errors.get(request["Key"]["trip_id"]["S"])
        if error is not None:
            raise error
        return {}

    def revisions_by_trip(self) -> dict[str, list[str]]:
        revisions: dict[str, list[str]] = {}
        for request in self.requests:
            trip_id = request["Key"]["trip_id"]["S"]
            revisions.setdefault(trip_id, []).append(request["ExpressionAttributeValues"][":rev"]["S"])
        return revisions


class FakeBatchClient:
    """``publish_batch`` and ``send_message_batch`` that record calls.

    Entries whose Id is in ``failed_ids`` come back under ``Failed``. When
    ``error`` is set, every call raises it.
    """

    def __init__(self, failed_ids: set[str] = frozenset(), error: Exception | None = None) -> None:
        self.failed_ids = set(failed_ids)
        self.error = error
        self.calls: list[dict] = []

    def publish_batch(self, **request):
        return self._respond(request, request["PublishBatchRequestEntries"])

    def send_message_batch(self, **request):
        return self._respond(request, request["Entries"])

    def _respond(self, request, entries):
        self.calls.append(request)
        if self.error is not None:
            raise self.error
        ids = [entry["Id"] for entry in entries]
        return {
            "Successful": [{"Id": i, "MessageId": f"m-{i}"} for i in ids if i not in self.failed_ids],
            "Failed": [
                {"Id": i, "Code": "InternalError", "SenderFault": False, "Message": "failed"}
                for i in ids
                if i in self.failed_ids
            ],
        }

    def entries(self) -> list[dict]:
        key = "PublishBatchRequestEntries"
        return [entry for call in self.calls for entry in call.get(key, call.get("Entries", []))]


class RecordingMetrics:
    """The ``add_metric`` part of Powertools Metrics, recording values by name."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add_metric(self, name, unit, value, resolution=60):
        self.values[name] = self.values.get(name, 0) + value


@pytest.fixture
def log_stream():
    return io.StringIO()


@pytest.fixture
def logger(log_stream):
    # A service name per test gives each test its own logging.Logger and stream.
    return Logger(service=f"stream-test-{uuid.uuid4().hex[:8]}", stream=log_stream)


def log_lines(log_stream) -> list[dict]:
    return [json.loads(line) for line in log_stream.getvalue().splitlines() if line]


def make_function(kind=EventKind.START, **options) -> StreamFunction:
    defaults = {
        "config": CONFIG,
        "dynamodb_client": FakeDynamoDB(),
        "sns_client": FakeBatchClient(),
        "sqs_client": FakeBatchClient(),
        "metrics": RecordingMetrics(),
    }
    return StreamFunction(kind, **{**defaults, **options})


def failures(*offsets: int) -> dict:
    return {"batchItemFailures": [{"itemIdentifier": sequence_number(offset)} for offset in offsets]}


# --- Outcomes and the response --------------------------------------------------


def test_handle_valid_and_invalid_mix():
    # GIVEN two valid events and two invalid ones
    function = make_function()
    event = kinesis_event([start_body("a"), b"not json", start_body("b"), {"trip_id": ""}], EventKind.START)

    # WHEN the batch is handled
    response = function.handle(event, lambda_context(EventKind.START))

    # THEN nothing is retried, valid events are written and invalid ones published in one call
    assert response == {"batchItemFailures": []}
    assert sorted(function._dynamodb_client.revisions_by_trip()) == ["a", "b"]
    assert len(function._sns_client.calls) == 1
    published = function._sns_client.entries()
    assert [entry["Id"] for entry in published] == ["1", "3"]
    assert function._sqs_client.calls == []


def test_handle_writes_each_trip_in_sequence_order():
    # GIVEN 12 trips with 4 versions each, interleaved, and writes of random duration
    dynamodb = FakeDynamoDB(jitter=0.003)
    function = make_function(dynamodb_client=dynamodb)
    bodies = [start_body(f"trip-{trip}", version) for version in range(4) for trip in range(12)]

    # WHEN the batch is handled with several threads
    response = function.handle(kinesis_event(bodies, EventKind.START), None)

    # THEN every trip's events were written in sequence-number order
    assert response == {"batchItemFailures": []}
    revisions = dynamodb.revisions_by_trip()
    assert len(revisions) == 12
    for trip_revisions in revisions.values():
        assert trip_revisions == sorted(trip_revisions)
        assert len(trip_revisions) == 4


def test_handle_single_thread_writes_in_order():
    dynamodb = FakeDynamoDB()
    function = make_function(dynamodb_client=dynamodb, write_threads=1)
    bodies = [start_body("x", 2), start_body("y", 1), start_body("x", 3)]

    function.handle(kinesis_event(bodies, EventKind.START), None)

    assert [request["Key"]["trip_id"]["S"] for request in dynamodb.requests] == ["x", "x", "y"]


def test_write_threads_must_be_positive():
    with pytest.raises(ValueError, match="write_threads"):
        StreamFunction(EventKind.START, write_threads=0)


def test_handle_failed_writes_go_to_retry_queue():
    # GIVEN a table that throttles trip "slow" and rejects trip "big" as too large
    dynamodb = FakeDynamoDB(
        errors={
            "slow": client_error("ProvisionedThroughputExceededException", "Rate exceeded"),
            "big": client_error("ValidationException", "Item size has exceeded the maximum"),
        }
    )
    function = make_function(kind=EventKind.START, dynamodb_client=dynamodb)
    event = kinesis_event([start_body("ok"), start_body("slow"), start_body("big")], EventKind.START)

    # WHEN the batch is handled
    response = function.handle(event, lambda_context(EventKind.START))

    # THEN both failed writes are on the retry queue, with the error in the envelope
    assert response == {"batchItemFailures": []}
    sent = function._sqs_client.entries()
    assert [entry["Id"] for entry in sent] == ["1", "2"]
    errors = [json.loads(entry["MessageBody"])["error"] for entry in sent]
    assert [(error["class"], error["reason"]) for error in errors] == [
        ("RetryableWriteError", "throttled"),
        ("PermanentWriteError", "item_too_large"),
    ]
    assert {json.loads(entry["MessageBody"])["function_name"] for entry in sent} == {"start-taxi-trips"}


def test_handle_failed_send_reports_record():
    dynamodb = FakeDynamoDB(errors={"slow": client_error("ThrottlingException")})
    sqs = FakeBatchClient(failed_ids={"2"})
    function = make_function(dynamodb_client=dynamodb, sqs_client=sqs)
    event = kinesis_event([start_body("slow"), start_body("ok"), start_body("slow", 1)], EventKind.START)

    response = function.handle(event, None)

    assert response == failures(2)


def test_handle_failed_publish_reports_record():
    sns = FakeBatchClient(failed_ids={"0"})
    function = make_function(sns_client=sns)
    event = kinesis_event([b"[]", start_body("ok"), b"{"], EventKind.START)

    response = function.handle(event, None)

    assert response == failures(0)


def test_handle_all_failed_returns_response():
    # GIVEN a topic whose every call raises and a batch of invalid events only
    sns = FakeBatchClient(error=client_error("NotFound", "Topic does not exist", 404))
    function = make_function(sns_client=sns)
    event = kinesis_event([b"x", b"y", b"z"], EventKind.START)

    # WHEN the batch is handled THEN all records are reported, and nothing raises
    assert function.handle(event, None) == failures(0, 1, 2)


def test_handle_publishes_in_calls_of_ten():
    sns = FakeBatchClient()
    function = make_function(sns_client=sns)
    event = kinesis_event([b"bad"] * 23, EventKind.START)

    response = function.handle(event, None)

    assert response == {"batchItemFailures": []}
    assert [len(call["PublishBatchRequestEntries"]) for call in sns.calls] == [10, 10, 3]
    for call in sns.calls:
        ids = [entry["Id"] for entry in call["PublishBatchRequestEntries"]]
        assert len(set(ids)) == len(ids)


def test_handle_unexpected_write_error_reports_record(log_stream, logger):
    # GIVEN a client that raises an error the writer does not classify
    dynamodb = FakeDynamoDB(errors={"odd": RuntimeError("client defect")})
    function = make_function(dynamodb_client=dynamodb, logger=logger)
    event = kinesis_event([start_body("ok"), start_body("odd")], EventKind.START)

    response = function.handle(event, None)

    assert response == failures(1)
    errors = [line for line in log_lines(log_stream) if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["sequence_number"] == sequence_number(1)
    assert "client defect" in errors[0]["exception"]


def test_handle_duplicate_records_keep_own_outcome():
    # GIVEN the same record twice in one batch, both invalid, and a topic that fails one entry
    record = kinesis_record(b"bad", EventKind.START, sequence_number(0))
    event = {"Records": [record, dict(record)]}
    function = make_function(sns_client=FakeBatchClient(failed_ids={"1"}))

    response = function.handle(event, None)

    assert response == failures(0)


def test_handle_empty_batch():
    function = make_function()

    assert function.handle({"Records": []}, None) == {"batchItemFailures": []}


# --- Metrics and logs -----------------------------------------------------------


def test_handle_publishes_every_metric():
    dynamodb = FakeDynamoDB(errors={"slow": client_error("ThrottlingException")})
    function = make_function(dynamodb_client=dynamodb, sqs_client=FakeBatchClient(failed_ids={"3"}))
    bodies = [
        start_body("a", extra_field=1, another=2),
        b"not json",
        start_body("slow"),
        start_body("slow", 1),
    ]

    function.handle(kinesis_event(bodies, EventKind.START), None)

    assert function.metrics.values == {
        "EventsValid": 3,
        "EventsInvalid": 1,
        "EventsWritten": 1,
        "EventsDuplicate": 0,
        "EventsStale": 0,
        "EventsWriteFailed": 2,
        "EventsSentForReplay": 1,
        "IgnoredFields": 2,
        "RecordsFailed": 1,
    }


def test_handle_logs_one_line_without_record_data(log_stream, logger):
    function = make_function(logger=logger)
    bodies = [start_body("a"), start_body("b"), b'{"driver_id": "driver-secret-42"}']

    function.handle(kinesis_event(bodies, EventKind.START), None)

    lines = log_lines(log_stream)
    assert len(lines) == 1
    line = lines[0]
    assert line["level"] == "INFO"
    assert line["message"] == "Processed Kinesis batch"
    assert line["records"] == 3
    assert line["EventsWritten"] == 2
    assert line["invalid_reasons"] == {"trip_id_missing": 1}
    assert line["first_sequence_number"] == sequence_number(0)
    assert line["last_sequence_number"] == sequence_number(2)
    assert "driver-secret-42" not in log_stream.getvalue()


def test_handle_logs_warning_when_records_failed(log_stream, logger):
    sns = FakeBatchClient(error=client_error("NotFound", "Topic does not exist", 404))
    function = make_function(sns_client=sns, logger=logger)

    function.handle(kinesis_event([b"bad", start_body("a")], EventKind.START), None)

    lines = log_lines(log_stream)
    assert [line["level"] for line in lines] == ["WARNING", "WARNING"]
    assert lines[0]["error_code"] == "NotFound"
    assert lines[0]["sequence_numbers"] == [sequence_number(0)]
    assert lines[1]["message"] == "Processed Kinesis batch with failed records"
    assert lines[1]["delivery_error_codes"] == {"NotFound": 1}


# --- Handler modules and cold start ---------------------------------------------


@pytest.mark.parametrize("kind", list(EventKind))
def test_handler_import_builds_no_client(kind):
    module = load_handler_module(kind)

    function = module.lambda_handler.stream_function
    assert function.kind is kind
    assert function.config is None
    assert function._writer is None
    assert function._sns_client is None


# Powertools warns that the failed invocation published no metrics.
@pytest.mark.filterwarnings("ignore:No application metrics to publish")
@pytest.mark.parametrize("missing", ["TABLE_NAME", "RETRY_QUEUE_URL"])
def test_handler_cold_start_names_missing_variable(monkeypatch, missing):
    # GIVEN an environment without one required variable
    monkeypatch.setenv("TABLE_NAME", CONFIG.table_name)
    monkeypatch.setenv("INVALID_TOPIC_ARN", CONFIG.invalid_topic_arn)
    monkeypatch.setenv("RETRY_QUEUE_URL", CONFIG.retry_queue_url)
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "TaxiPipelineTest")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", f"stream-test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(missing)
    module = load_handler_module(EventKind.END)

    # WHEN the first invocation runs THEN it fails with the variable's name
    with pytest.raises(ConfigurationError, match=missing):
        module.lambda_handler(kinesis_event([b"x"], EventKind.END), lambda_context(EventKind.END))
