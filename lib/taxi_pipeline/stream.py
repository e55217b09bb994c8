"""Kinesis batch processing shared by the start-taxi-trips and end-taxi-trips functions.

One invocation handles one batch of records from one shard, in three steps:

1. Each record is decoded and parsed. Valid events are written to the trip
   table. Writes of different trips run in a small thread pool, and the
   records of one trip are written one after another in sequence-number order.
2. Invalid events are published to the invalid-trips topic, and valid events
   whose write failed are sent to the retry queue in the envelope of
   ``taxi_pipeline.envelope``. Both go out in batch calls of up to 10 entries,
   and every entry of each response is checked.
3. A record counts as handled only when it is in the table, on the retry queue
   or on the topic. Every other record is reported in ``batchItemFailures``,
   so Lambda delivers it again.

This module needs ``aws_lambda_powertools``, which ships in the function zips
only. Nothing else in the library imports it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import (
    KinesisStreamRecord,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.envelope import SQS_REJECTED_CHARACTERS, build_envelope, escape_for_sqs
from taxi_pipeline.errors import InvalidEventError, TaxiPipelineError, WriteError
from taxi_pipeline.events import EventKind, TripEvent, parse_event
from taxi_pipeline.writes import TripWriter, WriteOutcome, WriteResult

# Environment variables that configure a stream function. Powertools reads
# POWERTOOLS_METRICS_NAMESPACE itself, but it is required here as well because
# Metrics raises at the end of an invocation when it is missing, which would
# fail every batch after its writes were done.
REQUIRED_ENVIRONMENT = {
    "TABLE_NAME": "the DynamoDB trip table",
    "INVALID_TOPIC_ARN": "the ARN of the SNS topic for invalid events",
    "RETRY_QUEUE_URL": "the URL of the SQS retry queue",
    "POWERTOOLS_METRICS_NAMESPACE": "the CloudWatch namespace of the function's metrics",
}

# Reason code of a record whose data field is not base64. Lambda always
# encodes Kinesis data as base64, so only a hand-made event can have it.
DATA_NOT_BASE64 = "data_not_base64"

# PublishBatch and SendMessageBatch take at most 10 entries per call. The
# bodies and attributes of a call's entries count against the message size
# limit, which topics and queues can raise to 1 MiB. 256 KiB (262,144 bytes)
# is SNS's default and SQS's former default, so every call stays under it.
MAX_BATCH_ENTRIES = 10
MAX_BATCH_BYTES = 256 * 1024

# Invalid payloads up to this size are published whole. A larger payload is
# cut to its first MAX_NOTIFICATION_PAYLOAD_BYTES bytes, so the notification
# (base64 expands by 4/3, plus attributes) stays far below 256 KiB.
MAX_NOTIFICATION_PAYLOAD_BYTES = 64 * 1024

# Writes of different trips run in parallel. DynamoDB calls are I/O-bound, so
# threads help even on a fraction of a vCPU, and 8 stays well below the
# client's connection pool (AwsSettings.max_pool_connections, 32).
WRITE_THREADS = 8

# Characters that SQS accepts in a message body (the XML 1.0 character set).
# SNS delivers to SQS subscribers, so notifications keep to the same set.


class ConfigurationError(TaxiPipelineError, ValueError):
    """A stream function's environment is missing a required variable."""


class RecordDeliveryError(TaxiPipelineError):
    """Failure to publish a record to the topic or to send it to the retry queue."""

    def __init__(self, sequence_number: str, destination: str, code: str, detail: str) -> None:
        self.sequence_number = sequence_number
        self.destination = destination
        self.code = code
        self.detail = detail
        super().__init__(f"record {sequence_number} was not delivered to the {destination}: {code}: {detail}")


@dataclass(frozen=True)
class StreamConfig:
    """Names of the resources a stream function writes to."""

    table_name: str
    invalid_topic_arn: str
    retry_queue_url: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StreamConfig:
        """Read the configuration, or raise ``ConfigurationError`` naming every missing variable."""
        values = os.environ if environ is None else environ
        missing = [name for name in REQUIRED_ENVIRONMENT if not values.get(name, "").strip()]
        if missing:
            described = ", ".join(f"{name} ({REQUIRED_ENVIRONMENT[name]})" for name in missing)
            raise ConfigurationError(
                f"Missing environment variables: {described}. Set them in the function configuration."
            )
        return cls(
            table_name=values["TABLE_NAME"].strip(),
            invalid_topic_arn=values["INVALID_TOPIC_ARN"].strip(),
            retry_queue_url=values["RETRY_QUEUE_URL"].strip(),
        )


@dataclass
class RecordState:
    """Progress and results of one Kinesis record within an invocation."""

    position: int
    record: KinesisStreamRecord
    payload: bytes | None = None
    event: TripEvent | None = None
    invalid: InvalidEventError | None = None
    write_result: WriteResult | None = None
    write_error: WriteError | None = None
    # The error that sends the record back to Kinesis, either an unexpected
    # error or a failed publish or send.
    failure: BaseException | None = None

    @property
    def sequence_number(self) -> str:
        """Return the record's sequence number, its ``itemIdentifier`` in a partial response."""
        return self.record.kinesis.sequence_number

    @property
    def entry_id(self) -> str:
        """Return the batch entry id, unique within an invocation and therefore within a call."""
        return str(self.position)


@dataclass(frozen=True)
class OutgoingEntry:
    """One PublishBatch or SendMessageBatch entry and its size as the service counts it."""

    state: RecordState
    request: dict[str, Any]
    size: int


@dataclass(frozen=True)
class NotificationPayload:
    """The message body of an invalid-event notification and the facts about the payload."""

    body: str
    encoding: str
    truncated: bool
    size: int
    sha256: str


class RecordOutcome(enum.StrEnum):
    """Final destination of a record after an invocation."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    PUBLISHED_INVALID = "published_invalid"
    SENT_FOR_REPLAY = "sent_for_replay"
    # Reported in batchItemFailures, so Lambda delivers the record again.
    FAILED = "failed"


_WRITE_OUTCOMES = {
    WriteOutcome.APPLIED: RecordOutcome.APPLIED,
    WriteOutcome.DUPLICATE: RecordOutcome.DUPLICATE,
    WriteOutcome.STALE: RecordOutcome.STALE,
}


def outcome_of(state: RecordState) -> RecordOutcome:
    """Return the final destination of a record once every step of the invocation has run."""
    if state.failure is not None:
        return RecordOutcome.FAILED
    if state.invalid is not None:
        return RecordOutcome.PUBLISHED_INVALID
    if state.write_error is not None:
        return RecordOutcome.SENT_FOR_REPLAY
    if state.write_result is not None:
        return _WRITE_OUTCOMES[state.write_result.outcome]
    # A valid event that was never written can only come from a defect in this module.
    raise RuntimeError(f"Internal error: record {state.sequence_number} has no outcome")


@dataclass
class BatchSummary:
    """Counts of one invocation, logged once and published as metrics."""

    records: int
    # Metric name to count. Every invocation publishes every name, so alarms
    # and dashboards that key on them see a 0 rather than no data.
    metrics: dict[str, int]
    invalid_reasons: dict[str, int]
    write_error_reasons: dict[str, int]
    delivery_error_codes: dict[str, int]


def summarise(states: Sequence[RecordState]) -> BatchSummary:
    """Count the events and outcomes of one invocation's records."""
    outcomes = Counter(outcome_of(state) for state in states)
    valid = [state.event for state in states if state.event is not None]
    invalid = [state.invalid for state in states if state.invalid is not None]
    write_errors = [state.write_error for state in states if state.write_error is not None]
    delivery_errors = [state.failure for state in states if isinstance(state.failure, RecordDeliveryError)]

    metrics = {
        "EventsValid": len(valid),
        "EventsInvalid": len(invalid),
        "EventsWritten": outcomes[RecordOutcome.APPLIED],
        "EventsDuplicate": outcomes[RecordOutcome.DUPLICATE],
        "EventsStale": outcomes[RecordOutcome.STALE],
        "EventsWriteFailed": len(write_errors),
        "EventsSentForReplay": outcomes[RecordOutcome.SENT_FOR_REPLAY],
        "IgnoredFields": sum(len(event.ignored_fields) for event in valid),
        "RecordsFailed": outcomes[RecordOutcome.FAILED],
    }
    return BatchSummary(
        records=len(states),
        metrics=metrics,
        invalid_reasons=dict(Counter(error.reason for error in invalid)),
        write_error_reasons=dict(Counter(error.reason for error in write_errors)),
        delivery_error_codes=dict(Counter(error.code for error in delivery_errors)),
    )


# --- Step 1: decode, parse and write --------------------------------------------


def parse_record(state: RecordState, kind: EventKind) -> None:
    """Decode the record's data and parse it as an event of ``kind``, recording the result."""
    try:
        state.payload = state.record.kinesis.data_as_bytes()
    except binascii.Error as exc:
        state.invalid = InvalidEventError(DATA_NOT_BASE64, f"record data is not valid base64: {exc}")
        return

    try:
        state.event = parse_event(state.payload, kind)
    except InvalidEventError as exc:
        state.invalid = exc


def group_by_trip(states: Sequence[RecordState]) -> list[list[RecordState]]:
    """Group the records of valid events by trip id, each group in sequence-number order.

    Kinesis orders records within a shard by sequence number, and a batch
    comes from one shard. Writes are idempotent and keep the highest revision
    whatever the order, but a fixed order makes the outcome of each write
    (applied, duplicate, stale) repeatable.
    """
    groups: dict[str, list[RecordState]] = {}
    for state in states:
        if state.event is not None:
            groups.setdefault(state.event.trip_id, []).append(state)
    for group in groups.values():
        group.sort(key=lambda state: (int(state.sequence_number), state.position))
    return list(groups.values())


# --- Step 2: notifications for invalid events and envelopes for failed writes ---


def shard_id_of(record: KinesisStreamRecord) -> str:
    """Return the shard id from an ``eventID`` (``shardId-000000000000:<sequence number>``)."""
    return record.event_id.partition(":")[0]


def build_notification_payload(payload: bytes) -> NotificationPayload:
    """Build the message body for an invalid payload, as text when possible, else as base64.

    The body is the payload's UTF-8 text when the payload decodes and contains
    only characters that SQS accepts, and the base64 of the bytes otherwise.
    A payload over ``MAX_NOTIFICATION_PAYLOAD_BYTES`` keeps only its first
    bytes. SNS rejects an empty message, so an empty payload gets the body
    ``(empty)`` and the encoding ``empty``.
    """
    digest = hashlib.sha256(payload).hexdigest()
    truncated = len(payload) > MAX_NOTIFICATION_PAYLOAD_BYTES
    kept = payload[:MAX_NOTIFICATION_PAYLOAD_BYTES]

    if not payload:
        return NotificationPayload("(empty)", "empty", False, 0, digest)

    try:
        payload.decode("utf-8")
        # The full payload is valid UTF-8, so the only bytes that can fail to
        # decode here belong to a character cut off at the truncation point.
        text = kept.decode("utf-8", errors="ignore")
    except UnicodeDecodeError:
        text = None

    if text and not SQS_REJECTED_CHARACTERS.search(text):
        return NotificationPayload(text, "text", truncated, len(payload), digest)
    return NotificationPayload(
        base64.b64encode(kept).decode("ascii"), "base64", truncated, len(payload), digest
    )


def build_notification_entry(state: RecordState, kind: EventKind) -> OutgoingEntry:
    """Build the PublishBatch entry for an invalid event."""
    record = state.record
    payload = state.payload if state.payload is not None else record.kinesis.data.encode("utf-8")
    message = build_notification_payload(payload)

    attributes = {
        "reason": ("String", state.invalid.reason),
        "event_kind": ("String", kind.value),
        "stream": ("String", record.event_source_arn),
        "sequence_number": ("String", state.sequence_number),
        "shard_id": ("String", shard_id_of(record)),
        "encoding": ("String", message.encoding),
        "payload_truncated": ("String", "true" if message.truncated else "false"),
        "payload_bytes": ("Number", str(message.size)),
        "payload_sha256": ("String", message.sha256),
    }
    # SNS rejects an attribute with an empty value, so such attributes are left out.
    message_attributes = {
        name: {"DataType": data_type, "StringValue": value}
        for name, (data_type, value) in attributes.items()
        if value
    }
    request = {
        "Id": state.entry_id,
        "Message": message.body,
        "MessageAttributes": message_attributes,
    }
    size = _utf8_length(message.body) + sum(
        _utf8_length(name) + _utf8_length(value["DataType"]) + _utf8_length(value["StringValue"])
        for name, value in message_attributes.items()
    )
    return OutgoingEntry(state, request, size)


def build_retry_entry(state: RecordState, kind: EventKind, function_name: str | None) -> OutgoingEntry:
    """Build the SendMessageBatch entry that carries a failed write to the retry queue."""
    record = state.record
    source = {
        "stream_arn": record.event_source_arn,
        "shard_id": shard_id_of(record),
        "sequence_number": state.sequence_number,
        "event_id": record.event_id,
        "approximate_arrival_timestamp": record.kinesis.approximate_arrival_timestamp,
    }
    envelope = build_envelope(kind, state.payload, state.write_error, source, function_name=function_name)
    body = escape_for_sqs(envelope)
    return OutgoingEntry(state, {"Id": state.entry_id, "MessageBody": body}, _utf8_length(body))


def split_into_batches(
    entries: Sequence[OutgoingEntry],
    max_entries: int = MAX_BATCH_ENTRIES,
    max_bytes: int = MAX_BATCH_BYTES,
) -> list[list[OutgoingEntry]]:
    """Split entries into calls of at most ``max_entries`` entries and ``max_bytes`` bytes.

    An entry larger than ``max_bytes`` goes alone into its own call, where the
    service rejects it and the record is reported as failed.
    """
    batches: list[list[OutgoingEntry]] = []
    current: list[OutgoingEntry] = []
    current_bytes = 0
    for entry in entries:
        if current and (len(current) >= max_entries or current_bytes + entry.size > max_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += entry.size
    if current:
        batches.append(current)
    return batches


def deliver_in_batches(
    entries: Sequence[OutgoingEntry],
    send: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    destination: str,
    logger: Logger | None = None,
) -> list[RecordDeliveryError]:
    """Send the entries in batch calls and mark every record whose entry failed.

    An entry fails when its call raises, when the response lists it under
    ``Failed``, or when the response lists it nowhere. The failure is stored
    on the record's state and also returned.
    """
    failures: list[RecordDeliveryError] = []
    for batch in split_into_batches(entries):
        try:
            response = send([entry.request for entry in batch])
        except (ClientError, BotoCoreError) as exc:
            code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
            code = code or type(exc).__name__
            sequence_numbers = [entry.state.sequence_number for entry in batch]
            if logger is not None:
                logger.warning(
                    f"Batch call to the {destination} failed, so its records are reported for redelivery",
                    extra={
                        "error": str(exc),
                        "error_code": code,
                        "sequence_numbers": sequence_numbers,
                    },
                )
            for entry in batch:
                failures.append(_mark_failed(entry.state, destination, code, str(exc)))
            continue

        failed = {item.get("Id"): item for item in response.get("Failed", [])}
        succeeded = {item.get("Id") for item in response.get("Successful", [])}
        batch_failures = []
        for entry in batch:
            entry_id = entry.request["Id"]
            if entry_id in failed:
                item = failed[entry_id]
                batch_failures.append(
                    _mark_failed(
                        entry.state,
                        destination,
                        item.get("Code", "Unknown"),
                        item.get("Message", ""),
                    )
                )
            elif entry_id not in succeeded:
                batch_failures.append(
                    _mark_failed(
                        entry.state,
                        destination,
                        "MissingFromResponse",
                        "the response does not list the entry",
                    )
                )
        if batch_failures and logger is not None:
            logger.warning(
                f"{len(batch_failures)} of {len(batch)} entries failed in a batch call "
                f"to the {destination}, so their records are reported for redelivery",
                extra={
                    "error_codes": dict(Counter(failure.code for failure in batch_failures)),
                    "sequence_numbers": [failure.sequence_number for failure in batch_failures],
                },
            )
        failures.extend(batch_failures)
    return failures


def _mark_failed(state: RecordState, destination: str, code: str, detail: str) -> RecordDeliveryError:
    error = RecordDeliveryError(state.sequence_number, destination, code, detail)
    state.failure = error
    return error


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8"))


# --- The function ---------------------------------------------------------------


class StreamFunction:
    """The batch logic of one stream function, for start or end events.

    Configuration and AWS clients are built on the first invocation (the cold
    start) unless they are passed in, so importing a handler module reads no
    environment and opens no connection. Pass ``config`` and clients to run
    the function against other resources, as the tests do.
    """

    def __init__(
        self,
        kind: EventKind,
        *,
        logger: Logger | None = None,
        metrics: Metrics | None = None,
        config: StreamConfig | None = None,
        settings: AwsSettings | None = None,
        dynamodb_client: Any = None,
        sns_client: Any = None,
        sqs_client: Any = None,
        write_threads: int = WRITE_THREADS,
    ) -> None:
        if write_threads < 1:
            raise ValueError(f"write_threads must be at least 1, got {write_threads}")
        self.kind = EventKind(kind)
        self.logger = logger
        self.metrics = metrics
        self.config = config
        self.settings = settings
        self.write_threads = write_threads
        self._dynamodb_client = dynamodb_client
        self._sns_client = sns_client
        self._sqs_client = sqs_client
        self._writer: TripWriter | None = None
        # raise_on_entire_batch_failure=False keeps the response a partial
        # response when every record failed, instead of raising.
        self.processor = BatchProcessor(
            event_type=EventType.KinesisDataStreams, raise_on_entire_batch_failure=False
        )

    def prepare(self) -> None:
        """Read the configuration and build the AWS clients, unless done already.

        Raises ``ConfigurationError`` when a required environment variable is missing.
        """
        if self._writer is not None:
            return
        config = self.config if self.config is not None else StreamConfig.from_env()
        settings = self.settings if self.settings is not None else AwsSettings.from_env()
        if self._sns_client is None:
            self._sns_client = settings.client("sns")
        if self._sqs_client is None:
            self._sqs_client = settings.client("sqs")
        self._writer = TripWriter(config.table_name, client=self._dynamodb_client, settings=settings)
        self.config = config

    def handle(self, event: dict[str, Any], context: LambdaContext | None) -> PartialItemFailureResponse:
        """Process one Kinesis batch and return its partial batch response."""
        # NOTE: nothing here watches the remaining time. An invocation that
        # times out is retried whole by Lambda, which is safe for the table but
        # publishes and sends its notifications and envelopes again.
        self.prepare()
        states = [
            RecordState(position, KinesisStreamRecord(raw))
            for position, raw in enumerate(event.get("Records", []))
        ]

        for state in states:
            self._parse(state)
        self._write_all(states)

        function_name = getattr(context, "function_name", None)
        if function_name is None:
            function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        self._publish_invalid(states)
        self._send_for_replay(states, function_name)

        response = self._respond(event, states, context)
        self._report(states)
        return response

    def _parse(self, state: RecordState) -> None:
        try:
            parse_record(state, self.kind)
        except Exception as exc:  # One defective record must not stop the batch.
            self._fail_unexpectedly(state, "parse", exc)

    def _write_all(self, states: Sequence[RecordState]) -> None:
        groups = group_by_trip(states)
        if len(groups) <= 1 or self.write_threads == 1:
            for group in groups:
                self._write_trip(group)
            return
        with ThreadPoolExecutor(max_workers=min(self.write_threads, len(groups))) as pool:
            # list() waits for every group and re-raises an error that escaped _write_trip.
            list(pool.map(self._write_trip, groups))

    def _write_trip(self, group: Sequence[RecordState]) -> None:
        """Write one trip's events in order. A failed write does not stop the later ones."""
        for state in group:
            try:
                state.write_result = self._writer.apply(state.event)
            except WriteError as exc:
                state.write_error = exc
            except Exception as exc:  # One defective record must not stop the batch.
                self._fail_unexpectedly(state, "write", exc)

    def _fail_unexpectedly(self, state: RecordState, step: str, exc: Exception) -> None:
        state.failure = exc
        if self.logger is not None:
            self.logger.exception(
                f"Unexpected error in the {step} step, so the record is reported for redelivery",
                extra={"sequence_number": state.sequence_number},
            )

    def _publish_invalid(self, states: Sequence[RecordState]) -> None:
        entries = [
            build_notification_entry(state, self.kind)
            for state in states
            if state.invalid is not None and state.failure is None
        ]
        if not entries:
            return

        def publish(batch: list[dict[str, Any]]) -> Mapping[str, Any]:
            return self._sns_client.publish_batch(
                TopicArn=self.config.invalid_topic_arn, PublishBatchRequestEntries=batch
            )

        deliver_in_batches(entries, publish, "invalid-event topic", self.logger)

    def _send_for_replay(self, states: Sequence[RecordState], function_name: str | None) -> None:
        entries = [
            build_retry_entry(state, self.kind, function_name)
            for state in states
            if state.write_error is not None and state.failure is None
        ]
        if not entries:
            return

        def send(batch: list[dict[str, Any]]) -> Mapping[str, Any]:
            return self._sqs_client.send_message_batch(QueueUrl=self.config.retry_queue_url, Entries=batch)

        deliver_in_batches(entries, send, "retry queue", self.logger)

    def _respond(
        self, event: dict[str, Any], states: Sequence[RecordState], context: LambdaContext | None
    ) -> PartialItemFailureResponse:
        """Let Powertools build the partial response from the outcomes decided above.

        The record handler runs once per record and raises the stored failure,
        which makes BatchProcessor list that record's sequence number.
        Records are matched by identity, so two records with the same
        sequence number keep their own outcomes.
        """
        if not states:
            # Lambda never sends an empty batch, and Powertools rejects one.
            return {"batchItemFailures": []}
        failures = {id(state.record.raw_event): state.failure for state in states}

        def report_record(record: KinesisStreamRecord) -> None:
            failure = failures[id(record.raw_event)]
            if failure is not None:
                raise failure

        return process_partial_response(
            event=event, record_handler=report_record, processor=self.processor, context=context
        )

    def _report(self, states: Sequence[RecordState]) -> None:
        """Publish the invocation's metrics and log its one summary line."""
        summary = summarise(states)
        if self.metrics is not None:
            for name, value in summary.metrics.items():
                self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
        if self.logger is None:
            return

        details: dict[str, Any] = {
            "event_kind": self.kind.value,
            "records": summary.records,
            **summary.metrics,
            "invalid_reasons": summary.invalid_reasons,
            "write_error_reasons": summary.write_error_reasons,
            "delivery_error_codes": summary.delivery_error_codes,
        }
        if states:
            details["stream"] = states[0].record.event_source_arn
            details["shard_id"] = shard_id_of(states[0].record)
            details["first_sequence_number"] = states[0].sequence_number
            details["last_sequence_number"] = states[-1].sequence_number

        if summary.metrics["RecordsFailed"]:
            self.logger.warning("Processed Kinesis batch with failed records", extra=details)
        else:
            self.logger.info("Processed Kinesis batch", extra=details)


def create_lambda_handler(
    kind: EventKind, **function_options: Any
) -> Callable[[dict[str, Any], LambdaContext], PartialItemFailureResponse]:
    """Build the ``lambda_handler`` of a stream function for ``kind``.

    The handler gets the Powertools ``Logger`` (with the Lambda context) and
    ``Metrics`` (flushed after each invocation, with a ColdStart metric).
    ``function_options`` go to ``StreamFunction``.
    """
    logger = Logger()
    metrics = Metrics()
    function = StreamFunction(kind, logger=logger, metrics=metrics, **function_options)

    # log_event=False overrides POWERTOOLS_LOGGER_LOG_EVENT, because a whole
    # event contains driver ids, which are personal data.
    @logger.inject_lambda_context(log_event=False, clear_state=True)
    @metrics.log_metrics(capture_cold_start_metric=True)
    def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
        return function.handle(event, context)

    lambda_handler.stream_function = function
    return lambda_handler
