"""Check a pipeline run against what was sent, independently of the code under test.

The expected table is derived here from the source rows with a small
conversion of its own, written from the data's documented shape rather than
from ``taxi_pipeline.events`` or ``taxi_pipeline.writes``, so that a bug in
those modules cannot hide itself:

* a portal timestamp (``2023/01/23 06:37:21 AM``, San Francisco local time)
  becomes ISO-8601 with the ``America/Los_Angeles`` offset of that instant;
* a number, or a text with thousands separators (``"2,081,284"``), becomes a
  ``Decimal``, a float through its shortest ``repr``;
* ``-``, an empty text and null mean "no value": the attribute is absent;
* ``trip_status`` is ``ended`` once the trip has an end row, else ``started``.

The checks are these. The table contains exactly the expected items and
attributes. Every corrupted event reached the check queue with its reason
code. The retry queue is empty, and the dead-letter queues contain only the
expected messages.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from boto3.dynamodb.types import TypeDeserializer

logger = logging.getLogger(__name__)

SAN_FRANCISCO = ZoneInfo("America/Los_Angeles")
PORTAL_TIMESTAMP = "%Y/%m/%d %I:%M:%S %p"
DEFAULT_MAX_DETAILS = 10
SQS_MAX_MESSAGES_PER_RECEIVE = 10

KEY = "trip_id"
STATUS = "trip_status"
REVISIONS = {"start": "start_revision", "end": "end_revision"}
# A revision is a 20-digit zero-padded version, a colon and a SHA-256 digest.
REVISION_PATTERN = re.compile(r"^\d{20}:[0-9a-f]{64}$")

TIMESTAMP, TEXT, NUMBER = "timestamp", "text", "number"
START_FIELDS: dict[str, str] = {
    "start_time_local": TIMESTAMP,
    "vehicle_placard_number": TEXT,
    "driver_id": TEXT,
    "pickup_location_latitude": NUMBER,
    "pickup_location_longitude": NUMBER,
    "dropoff_location_latitude": NUMBER,
    "dropoff_location_longitude": NUMBER,
    "hail_type": TEXT,
    "upfront_pricing": NUMBER,
}
END_FIELDS: dict[str, str] = {
    "end_time_local": TIMESTAMP,
    "fare_type": TEXT,
    "meter_fare_amount": NUMBER,
    "promo_rate": NUMBER,
    "tolls": NUMBER,
    "sf_exit_fee": NUMBER,
    "other_fees": NUMBER,
    "tip": NUMBER,
    "extra_amount": NUMBER,
    "total_fare_amount": NUMBER,
    "fare_time_milliseconds": NUMBER,
    "trip_distance_meters": NUMBER,
    "qa_flags": TEXT,
    "paratransit": NUMBER,
}
NO_VALUE_TEXTS = frozenset({"", "-"})
# Values never shown in a mismatch line, because they identify a person.
PERSONAL_ATTRIBUTES = frozenset({"driver_id"})

_deserializer = TypeDeserializer()


# --- Results ----------------------------------------------------------------------


@dataclass
class CheckResult:
    """The outcome of one check: passed, failed or skipped (``passed`` is ``None``).

    ``details`` lists the first mismatches; ``mismatches`` counts them all.
    """

    name: str
    passed: bool | None
    summary: str
    details: list[str] = field(default_factory=list)
    mismatches: int = 0

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL`` or ``SKIP``."""
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-ready values."""
        return {
            "name": self.name,
            "status": self.status,
            "summary": self.summary,
            "mismatches": self.mismatches,
            "details": list(self.details),
        }


@dataclass
class VerificationReport:
    """The results of every check of one run."""

    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when at least one check ran and none failed."""
        ran = [check for check in self.checks if check.passed is not None]
        return bool(ran) and all(check.passed for check in ran)

    def count(self, status: str) -> int:
        """Count the checks with ``status`` ``PASS``, ``FAIL`` or ``SKIP``."""
        return sum(1 for check in self.checks if check.status == status)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-ready values."""
        return {"passed": self.passed, "checks": [check.to_dict() for check in self.checks]}

    def render_text(self) -> str:
        """Return one line per check, each followed by its first mismatches."""
        lines = []
        for check in self.checks:
            lines.append(f"{check.status:<4}  {check.name}: {check.summary}")
            lines.extend(f"        - {detail}" for detail in check.details)
        return "\n".join(lines)


# --- Expected table -------------------------------------------------------------------


def expected_value(field_type: str, value: Any) -> Any:
    """Convert one source value to the value the table must hold, or ``None`` for "absent".

    Raises ``ValueError`` for a value that cannot be converted, which means
    the source row itself is invalid and cannot serve as an expectation.
    """
    if value is None:
        return None
    if field_type == TEXT:
        text = str(value).strip()
        return None if text in NO_VALUE_TEXTS else text
    if field_type == TIMESTAMP:
        text = str(value).strip()
        return None if not text else _expected_timestamp(text)
    return _expected_number(value)


def _expected_timestamp(text: str) -> str:
    try:
        moment = datetime.strptime(text, PORTAL_TIMESTAMP)
    except ValueError:
        moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=SAN_FRANCISCO).isoformat()
    return moment.astimezone(SAN_FRANCISCO).isoformat()


def _expected_number(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int | Decimal):
        return Decimal(value)
    text = str(value).strip().replace(",", "")
    if text in NO_VALUE_TEXTS:
        return None
    try:
        return Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"{value!r} is not a number") from exc


def expected_items(
    start_rows: Iterable[Mapping[str, Any]], end_rows: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Return the expected table item of every trip, keyed by trip id.

    Each item also lists, under ``_revisions``, the revision attributes it
    must have; ``compare_table`` checks their presence and form. Pass one row
    per trip and kind: of two rows of one kind, the later row wins here,
    while the pipeline keeps the one with the higher revision.
    """
    items: dict[str, dict[str, Any]] = {}
    for rows, fields, kind in ((start_rows, START_FIELDS, "start"), (end_rows, END_FIELDS, "end")):
        for row in rows:
            trip_id = str(row["trip_id"]).strip()
            item = items.setdefault(trip_id, {KEY: trip_id})
            for name, field_type in fields.items():
                value = expected_value(field_type, row.get(name))
                if value is None:
                    item.pop(name, None)
                else:
                    item[name] = value
            item.setdefault("_kinds", set()).add(kind)

    for item in items.values():
        kinds = item.pop("_kinds")
        item[STATUS] = "ended" if "end" in kinds else "started"
        item["_revisions"] = frozenset(REVISIONS[kind] for kind in kinds)
    return items


# --- Table check --------------------------------------------------------------------


def read_table(dynamodb: Any, table_name: str) -> dict[str, dict[str, Any]]:
    """Scan the whole table with consistent reads and return its items keyed by trip id."""
    items: dict[str, dict[str, Any]] = {}
    request: dict[str, Any] = {"TableName": table_name, "ConsistentRead": True}
    while True:
        response = dynamodb.scan(**request)
        for raw in response.get("Items", []):
            item = {name: _deserializer.deserialize(value) for name, value in raw.items()}
            items[str(item.get(KEY))] = item
        if "LastEvaluatedKey" not in response:
            return items
        request["ExclusiveStartKey"] = response["LastEvaluatedKey"]


def compare_table(
    expected: Mapping[str, Mapping[str, Any]],
    actual: Mapping[str, Mapping[str, Any]],
    max_details: int = DEFAULT_MAX_DETAILS,
) -> CheckResult:
    """Compare the table's items with the expected ones, attribute by attribute.

    A mismatch is a missing item, an item for no trip that was sent, a
    business attribute with a wrong or missing value, an extra attribute, or
    a revision attribute that is missing or malformed.
    """
    mismatches: list[str] = []
    for trip_id in sorted(expected.keys() - actual.keys()):
        mismatches.append(f"trip {trip_id}: missing from the table")
    for trip_id in sorted(actual.keys() - expected.keys()):
        mismatches.append(f"trip {trip_id}: in the table, but no event of it was sent")

    matching = 0
    for trip_id in sorted(expected.keys() & actual.keys()):
        problems = _compare_item(trip_id, expected[trip_id], actual[trip_id])
        mismatches.extend(problems)
        matching += not problems

    summary = f"{matching} of {len(expected)} expected trips match; {len(actual)} items in the table"
    if mismatches:
        summary += f"; {len(mismatches)} mismatches"
    return CheckResult(
        name="table equals the expected trips",
        passed=not mismatches,
        summary=summary,
        details=mismatches[:max_details],
        mismatches=len(mismatches),
    )


def _compare_item(trip_id: str, expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    revisions: frozenset[str] = expected.get("_revisions", frozenset())
    business = {name: value for name, value in expected.items() if not name.startswith("_")}

    for name, value in business.items():
        if name not in actual:
            problems.append(f"trip {trip_id}: attribute {name} is missing, expected {_show(name, value)}")
        elif not _same_value(value, actual[name]):
            problems.append(
                f"trip {trip_id}: attribute {name} is {_show(name, actual[name])}, "
                f"expected {_show(name, value)}"
            )

    for name in sorted(revisions):
        stored = actual.get(name)
        if stored is None:
            problems.append(f"trip {trip_id}: revision attribute {name} is missing")
        elif not isinstance(stored, str) or not REVISION_PATTERN.match(stored):
            problems.append(f"trip {trip_id}: revision attribute {name} is malformed: {stored!r}")

    for name in sorted(actual.keys() - business.keys() - revisions):
        problems.append(f"trip {trip_id}: extra attribute {name} = {_show(name, actual[name])}")
    return problems


def _show(name: str, value: Any) -> str:
    """Format a value for a mismatch line: numbers plainly, text quoted, driver ids hidden."""
    if name in PERSONAL_ATTRIBUTES:
        return "(hidden: personal data)"
    if isinstance(value, Decimal):
        return f"{value} (number)"
    return repr(value)


def _same_value(expected: Any, actual: Any) -> bool:
    """Compare numbers by value, because DynamoDB drops trailing zeros, and the rest exactly."""
    if isinstance(expected, Decimal):
        return isinstance(actual, Decimal) and actual == expected
    return type(actual) is type(expected) and actual == expected


# --- Queue checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class QueueMessage:
    """A message read from a queue: its body and its string message attributes."""

    body: str
    attributes: dict[str, str]

    @property
    def reason(self) -> str | None:
        """The ``reason`` attribute, from SQS attributes or from an SNS envelope."""
        return self.attributes.get("reason")

    @property
    def trip_id(self) -> str | None:
        """The trip id named by the message, if any."""
        if self.attributes.get("trip_id"):
            return self.attributes["trip_id"]
        try:
            document = json.loads(self.body)
        except ValueError:
            return None
        value = document.get("trip_id") if isinstance(document, dict) else None
        return value if isinstance(value, str) else None


def peek_messages(sqs: Any, queue_url: str, max_messages: int = 10_000) -> list[QueueMessage]:
    """Read every visible message of a queue, then make them visible again.

    The messages stay on the queue, so a check can run twice. An SNS
    envelope (a subscription without raw message delivery) is opened, and
    its message attributes are used.
    """
    messages: list[QueueMessage] = []
    handles: list[str] = []
    try:
        while len(messages) < max_messages:
            response = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=SQS_MAX_MESSAGES_PER_RECEIVE,
                MessageAttributeNames=["All"],
                VisibilityTimeout=60,
                WaitTimeSeconds=1,
            )
            batch = response.get("Messages", [])
            if not batch:
                break
            for message in batch:
                handles.append(message["ReceiptHandle"])
                messages.append(_queue_message(message))
    finally:
        _make_visible(sqs, queue_url, handles)
    return messages


def _queue_message(message: Mapping[str, Any]) -> QueueMessage:
    body = message.get("Body", "")
    attributes = {
        name: value.get("StringValue", "")
        for name, value in (message.get("MessageAttributes") or {}).items()
        if "StringValue" in value
    }
    try:
        envelope = json.loads(body)
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and envelope.get("Type") == "Notification" and "Message" in envelope:
        body = envelope["Message"]
        for name, value in (envelope.get("MessageAttributes") or {}).items():
            if isinstance(value, dict) and "Value" in value:
                attributes.setdefault(name, str(value["Value"]))
    return QueueMessage(body=body, attributes=attributes)


def _make_visible(sqs: Any, queue_url: str, handles: list[str]) -> None:
    for start in range(0, len(handles), SQS_MAX_MESSAGES_PER_RECEIVE):
        entries = [
            {"Id": str(index), "ReceiptHandle": handle, "VisibilityTimeout": 0}
            for index, handle in enumerate(handles[start : start + SQS_MAX_MESSAGES_PER_RECEIVE])
        ]
        response = sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
        if response.get("Failed"):
            logger.warning(
                "%d messages of %s stay hidden for up to 60 s: %s",
                len(response["Failed"]),
                queue_url,
                response["Failed"][0],
            )


@dataclass(frozen=True)
class ExpectedRejection:
    """A corrupted event and the reason code it must be rejected with.

    ``stream`` and ``sequence_number`` identify the Kinesis record, when known.
    """

    reason: str
    trip_id: str | None = None
    corruption: str | None = None
    stream: str | None = None
    sequence_number: str | None = None

    @property
    def label(self) -> str:
        """Name the record for a mismatch line."""
        what = self.corruption or "corrupted event"
        where = f" (record {self.sequence_number} on {self.stream})" if self.sequence_number else ""
        return f"{what}{where}"


def check_invalid_events(
    expected: Iterable[ExpectedRejection],
    received: Iterable[QueueMessage],
    max_details: int = DEFAULT_MAX_DETAILS,
) -> CheckResult:
    """Check that the invalid-event notifications match the corrupted events one for one.

    A notification whose ``stream`` and ``sequence_number`` attributes name a
    corrupted record must carry that record's reason. The notifications left
    over are compared with the records left over by reason code, as
    multisets, so a valid event rejected by mistake, a missing notification
    and a repeated one all show up.
    """
    expected = list(expected)
    received = list(received)
    by_record = {(item.stream, item.sequence_number): item for item in expected if item.sequence_number}
    problems: list[str] = []
    matched: set[tuple[str | None, str | None]] = set()
    unmatched: list[QueueMessage] = []

    for message in received:
        record = (
            _stream_name(message.attributes.get("stream")),
            message.attributes.get("sequence_number"),
        )
        item = by_record.get(record)
        if item is None:
            unmatched.append(message)
        elif record in matched:
            problems.append(f"{item.label}: notified more than once")
        else:
            matched.add(record)
            if message.reason != item.reason:
                problems.append(f"{item.label}: reason {message.reason}, expected {item.reason}")

    left = [item for item in expected if (item.stream, item.sequence_number) not in matched]
    wanted = Counter(item.reason for item in left)
    got = Counter(message.reason or "(no reason attribute)" for message in unmatched)
    for reason in sorted(wanted.keys() | got.keys()):
        if wanted[reason] > got[reason]:
            labels = sorted(item.label for item in left if item.reason == reason)
            problems.append(
                f"reason {reason}: {wanted[reason] - got[reason]} notification(s) missing, "
                f"for {', '.join(labels)}"
            )
        elif got[reason] > wanted[reason]:
            trips = sorted({message.trip_id or "?" for message in unmatched if message.reason == reason})
            problems.append(
                f"reason {reason}: {got[reason] - wanted[reason]} unexpected notification(s), "
                f"trips {', '.join(trips)}"
            )

    return CheckResult(
        name="invalid events reached the topic with their reason",
        passed=not problems,
        summary=f"{len(received)} notifications received, {len(expected)} expected",
        details=problems[:max_details],
        mismatches=len(problems),
    )


def _stream_name(stream: str | None) -> str | None:
    """Return the stream name of a stream ARN (``arn:...:stream/NAME``), or the text unchanged."""
    if not stream:
        return None
    return stream.rsplit("/", 1)[-1]


def queue_depth(sqs: Any, queue_url: str) -> int:
    """Return the messages of a queue: visible, in flight and delayed."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


def check_queue(
    sqs: Any,
    name: str,
    queue_url: str | None,
    expected_messages: int = 0,
    max_details: int = DEFAULT_MAX_DETAILS,
) -> CheckResult:
    """Check that a queue contains exactly ``expected_messages`` messages.

    The details show the trip ids and reasons of the first visible messages.
    """
    title = f"{name} holds {expected_messages} messages" if expected_messages else f"{name} is empty"
    if not queue_url:
        return CheckResult(name=title, passed=None, summary="skipped: queue URL unknown")

    depth = queue_depth(sqs, queue_url)
    details: list[str] = []
    if depth != expected_messages:
        for message in peek_messages(sqs, queue_url, max_messages=max_details)[:max_details]:
            details.append(_describe_queue_message(message))
    return CheckResult(
        name=title,
        passed=depth == expected_messages,
        summary=f"{depth} messages",
        details=details,
        mismatches=abs(depth - expected_messages),
    )


def _describe_queue_message(message: QueueMessage) -> str:
    """Name a queue message by trip and reason; the body is not shown, because it contains driver ids."""
    reason = message.reason
    trip_id = message.trip_id
    try:
        document = json.loads(message.body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error") if isinstance(document.get("error"), dict) else {}
        reason = reason or error.get("reason")
        event = document.get("event")
        if trip_id is None and isinstance(event, str):
            trip_id = QueueMessage(body=event, attributes={}).trip_id
        elif trip_id is None and isinstance(event, dict):
            trip_id = event.get("trip_id")
    return f"message for trip {trip_id or '?'} (reason {reason or '?'}, {len(message.body)} bytes)"


# --- The whole run ----------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyTargets:
    """The resources a run is checked in; a ``None`` queue URL skips its check."""

    table_name: str
    retry_queue_url: str | None
    dead_letter_queue_url: str | None = None
    stream_records_failed_queue_url: str | None = None
    check_queue_url: str | None = None


def verify_run(
    dynamodb: Any,
    sqs: Any,
    targets: VerifyTargets,
    start_rows: Iterable[Mapping[str, Any]],
    end_rows: Iterable[Mapping[str, Any]],
    rejections: Iterable[ExpectedRejection],
    *,
    expected_dead_letters: int = 0,
    max_details: int = DEFAULT_MAX_DETAILS,
) -> VerificationReport:
    """Run every check of a finished run and return the report."""
    report = VerificationReport()

    expected = expected_items(start_rows, end_rows)
    report.checks.append(compare_table(expected, read_table(dynamodb, targets.table_name), max_details))

    rejections = list(rejections)
    if targets.check_queue_url:
        notifications = peek_messages(sqs, targets.check_queue_url)
        report.checks.append(check_invalid_events(rejections, notifications, max_details))
    else:
        report.checks.append(
            CheckResult(
                name="invalid events reached the topic with their reason",
                passed=None,
                summary="skipped: no queue is subscribed to the invalid-trips topic for this run",
            )
        )

    report.checks.append(check_queue(sqs, "retry queue", targets.retry_queue_url, 0, max_details))
    report.checks.append(
        check_queue(
            sqs,
            "dead-letter queue",
            targets.dead_letter_queue_url,
            expected_dead_letters,
            max_details,
        )
    )
    report.checks.append(
        check_queue(
            sqs,
            "failed stream batches queue",
            targets.stream_records_failed_queue_url,
            0,
            max_details,
        )
    )
    logger.info(
        "verification: %d passed, %d failed, %d skipped",
        report.count("PASS"),
        report.count("FAIL"),
        report.count("SKIP"),
    )
    return report
