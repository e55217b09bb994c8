"""Benchmark inputs built from the trip sample, and the queues and tables they go to.

Every trip gets a new trip id, so one sample row yields as many distinct
trips as a benchmark needs. Rows are serialised digit for digit
(``taxi_pipeline.tooling.producer.encode_row``), as the producer sends them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.envelope import build_envelope
from taxi_pipeline.errors import RetryableWriteError
from taxi_pipeline.events import EventKind
from taxi_pipeline.tooling.producer import encode_row
from taxi_pipeline.tooling.sample import SampleNotFoundError, TripSample, read_sample
from taxi_pipeline.tooling.synthetic import generate_trips

logger = logging.getLogger(__name__)

DEFAULT_DUPLICATE_SHARE = 0.10
DEFAULT_CORRECTION_SHARE = 0.03
DEFAULT_BARE_SHARE = 0.20
SQS_BATCH_SIZE = 10
FILL_THREADS = 8
FILL_ATTEMPTS = 5
REGION = "us-east-1"
ACCOUNT_ID = "000000000000"
STREAM_ARNS = {
    EventKind.START: f"arn:aws:kinesis:{REGION}:{ACCOUNT_ID}:stream/start-trip-stream",
    EventKind.END: f"arn:aws:kinesis:{REGION}:{ACCOUNT_ID}:stream/end-trip-stream",
}
FUNCTION_NAMES = {EventKind.START: "start-taxi-trips", EventKind.END: "end-taxi-trips"}


def load_trips(data_dir: str | Path | None, seed: int = 0) -> TripSample:
    """Read the trip sample (``data_dir``, else ``$TAXI_SAMPLE_DIR``, else the default folder).

    When the folder or one of its files is missing, generated trips shaped
    like the sample are returned instead (``TripSample.synthetic`` is then
    true), so the benchmark still runs.
    """
    try:
        return read_sample(data_dir)
    except SampleNotFoundError as exc:
        logger.warning("trip sample not found (%s): using generated trips instead", exc)
        return generate_trips(seed=seed or 7)


def trip_pairs(sample: TripSample) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return the sample's (start row, end row) pairs, in the start file's order."""
    ends = {row["trip_id"]: row for row in sample.end_rows}
    pairs = [(start, ends[start["trip_id"]]) for start in sample.start_rows if start["trip_id"] in ends]
    if not pairs:
        raise ValueError(f"the trip sample from {sample.source} has no trip with both a start and an end row")
    return pairs


def new_trip_id(rng: random.Random) -> str:
    """Return a random version-4 UUID drawn from ``rng``, so a seed gives the same ids."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def renamed_pairs(sample: TripSample, count: int, rng: random.Random) -> list[tuple[dict, dict]]:
    """Return ``count`` trips made by cycling through the sample's pairs under new trip ids."""
    pairs = trip_pairs(sample)
    renamed = []
    for index in range(count):
        start, end = pairs[index % len(pairs)]
        trip_id = new_trip_id(rng)
        renamed.append(({**start, "trip_id": trip_id}, {**end, "trip_id": trip_id}))
    return renamed


def event_bodies(sample: TripSample, kind: EventKind, count: int, rng: random.Random) -> list[bytes]:
    """Return ``count`` serialised events of one kind, each of a new trip."""
    position = 0 if kind is EventKind.START else 1
    return [encode_row(pair[position]) for pair in renamed_pairs(sample, count, rng)]


@dataclass(frozen=True)
class RetryWorkload:
    """Retry-queue message bodies and what they contain.

    ``trips`` is the number of items the table contains once every message is
    applied. ``duplicates`` repeat another message's event (as an envelope
    or bare). ``corrections`` are end events sent in two versions, the newer
    one first, so the older one arrives out of order.
    """

    bodies: list[str]
    trips: int
    distinct_events: int
    duplicates: int
    corrections: int
    envelopes: int
    ends_before_starts: int

    def describe(self) -> dict[str, Any]:
        """Return the counts of the workload, without its bodies."""
        return {
            "messages": len(self.bodies),
            "trips": self.trips,
            "distinct_events": self.distinct_events,
            "duplicates": self.duplicates,
            "corrections": self.corrections,
            "envelopes": self.envelopes,
            "bare": len(self.bodies) - self.envelopes,
            "ends_before_starts": self.ends_before_starts,
            "mean_body_bytes": round(
                sum(len(body.encode("utf-8")) for body in self.bodies) / max(1, len(self.bodies))
            ),
        }


@dataclass
class _Message:
    kind: EventKind
    trip_id: str
    text: str
    order: float


def build_retry_workload(
    sample: TripSample,
    depth: int,
    seed: int = 0,
    *,
    duplicate_share: float = DEFAULT_DUPLICATE_SHARE,
    correction_share: float = DEFAULT_CORRECTION_SHARE,
    bare_share: float = DEFAULT_BARE_SHARE,
) -> RetryWorkload:
    """Build ``depth`` retry-queue messages from the sample, as the stream functions send them.

    Most messages carry the event in the retry envelope, ``bare_share`` of
    them as a bare event body. Messages are in random order, so about half
    of the trips have their end event ahead of their start event.
    """
    if depth < 2:
        raise ValueError(f"queue depth {depth} is invalid: use at least 2 messages")
    for name, share in (
        ("duplicate", duplicate_share),
        ("correction", correction_share),
        ("bare", bare_share),
    ):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{name} share {share!r} is invalid: use a share from 0 up to 1")
    rng = random.Random(seed)

    duplicates = round(depth * duplicate_share)
    corrections = round(depth * correction_share)
    distinct = depth - duplicates - corrections
    trips = math.ceil(distinct / 2)
    # With an odd number of distinct events the last trip has no end event.
    last_without_end = distinct % 2 == 1
    corrections = min(corrections, trips - int(last_without_end))
    duplicates = depth - distinct - corrections

    messages: list[_Message] = []
    for index, (start, end) in enumerate(renamed_pairs(sample, trips, rng)):
        trip_id = start["trip_id"]
        messages.append(_Message(EventKind.START, trip_id, _text(start), rng.random()))
        if last_without_end and index == trips - 1:
            continue
        if index < corrections:
            newer_row = {**end, "event_version": 2, "tip": _raised_tip(end.get("tip"))}
            first, second = sorted((rng.random(), rng.random()))
            messages.append(_Message(EventKind.END, trip_id, _text(newer_row), first))
            older_row = {**end, "event_version": 1}
            messages.append(_Message(EventKind.END, trip_id, _text(older_row), second))
        else:
            messages.append(_Message(EventKind.END, trip_id, _text(end), rng.random()))

    for _ in range(duplicates):
        original = rng.choice(messages)
        messages.append(_Message(original.kind, original.trip_id, original.text, rng.random()))
    messages.sort(key=lambda message: message.order)

    bodies: list[str] = []
    envelopes = 0
    for sequence, message in enumerate(messages):
        if rng.random() < bare_share:
            bodies.append(message.text)
            continue
        bodies.append(_envelope(message, sequence))
        envelopes += 1

    first_seen: dict[str, EventKind] = {}
    for message in messages:
        first_seen.setdefault(message.trip_id, message.kind)
    ends_first = sum(1 for kind in first_seen.values() if kind is EventKind.END)

    return RetryWorkload(
        bodies=bodies,
        trips=len(first_seen),
        distinct_events=distinct + corrections,
        duplicates=duplicates,
        corrections=corrections,
        envelopes=envelopes,
        ends_before_starts=ends_first,
    )


def _text(row: dict[str, Any]) -> str:
    return encode_row(row).decode("utf-8")


def _raised_tip(tip: Any) -> float:
    return round(float(tip or 0.0) + 1.0, 2)


def _envelope(message: _Message, sequence: int) -> str:
    """Wrap an event the way a stream function does after a throttled write."""
    sequence_number = str(
        49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898 + sequence
    )
    error = RetryableWriteError(
        message.trip_id,
        "throttled",
        "Rate of requests exceeds the allowed throughput.",
        code="ProvisionedThroughputExceededException",
    )
    source = {
        "stream_arn": STREAM_ARNS[message.kind],
        "shard_id": "shardId-000000000000",
        "sequence_number": sequence_number,
        "event_id": f"shardId-000000000000:{sequence_number}",
        "approximate_arrival_timestamp": 1_674_484_641.123,
    }
    return build_envelope(
        message.kind, message.text, error, source, function_name=FUNCTION_NAMES[message.kind]
    )


# --- Resources on the local endpoint ----------------------------------------------


@dataclass(frozen=True)
class RetryQueue:
    """A retry queue and the dead-letter queue its redrive policy names."""

    url: str
    dead_letter_url: str


def unique_name(prefix: str) -> str:
    """Return ``prefix`` with a random suffix, so runs never share a resource."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_trip_table(dynamodb: Any, prefix: str = "bench-trips") -> str:
    """Create an empty on-demand trip table keyed on ``trip_id`` and return its name."""
    name = unique_name(prefix)
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "trip_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "trip_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return name


def create_retry_queue(sqs: Any, prefix: str = "bench-retry", max_receive_count: int = 5) -> RetryQueue:
    """Create a retry queue whose redrive policy points at a new dead-letter queue."""
    dead_letter_url = sqs.create_queue(QueueName=unique_name(f"{prefix}-dlq"))["QueueUrl"]
    dead_letter_arn = sqs.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": max_receive_count})
    url = sqs.create_queue(QueueName=unique_name(prefix), Attributes={"RedrivePolicy": policy})["QueueUrl"]
    return RetryQueue(url=url, dead_letter_url=dead_letter_url)


def delete_retry_queue(sqs: Any, queue: RetryQueue) -> None:
    """Delete both queues, ignoring queues already gone."""
    for url in (queue.url, queue.dead_letter_url):
        try:
            sqs.delete_queue(QueueUrl=url)
        except sqs.exceptions.QueueDoesNotExist:
            pass


def delete_trip_table(dynamodb: Any, table_name: str) -> None:
    """Delete a table, ignoring a table already gone."""
    try:
        dynamodb.delete_table(TableName=table_name)
    except dynamodb.exceptions.ResourceNotFoundException:
        pass


def fill_queue(
    settings: AwsSettings, queue_url: str, bodies: Sequence[str], threads: int = FILL_THREADS
) -> float:
    """Send the bodies with concurrent ``SendMessageBatch`` calls and return the seconds it took.

    Entries the service lists as failed are sent again, up to
    ``FILL_ATTEMPTS`` times. Raises ``RuntimeError`` if any remain unsent.
    """
    sqs = settings.client("sqs", max_pool_connections=threads + 2)
    batches = [
        list(bodies[start : start + SQS_BATCH_SIZE]) for start in range(0, len(bodies), SQS_BATCH_SIZE)
    ]

    def send(batch: list[str]) -> int:
        pending = {str(index): body for index, body in enumerate(batch)}
        for _ in range(FILL_ATTEMPTS):
            entries = [{"Id": entry_id, "MessageBody": body} for entry_id, body in pending.items()]
            response = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
            for entry in response.get("Successful", []):
                pending.pop(entry["Id"], None)
            if not pending:
                return 0
        return len(pending)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        unsent = sum(pool.map(send, batches))
    if unsent:
        raise RuntimeError(f"{unsent} messages were not sent to {queue_url} after {FILL_ATTEMPTS} attempts")
    return time.perf_counter() - started


def count_items(dynamodb: Any, table_name: str) -> int:
    """Count the table's items with a paginated ``Scan``."""
    total = 0
    for page in dynamodb.get_paginator("scan").paginate(TableName=table_name, Select="COUNT"):
        total += page["Count"]
    return total


def time_queue_scans(sqs: Any, queue_url: str, calls: int = 10) -> float:
    """Return the median milliseconds of ``GetQueueAttributes`` on the queue, one call at a time.

    MiniStack 1.5.33 keeps a queue's messages in one Python list and walks
    it to count them, as it does on every ReceiveMessage and for every entry
    of DeleteMessageBatch, so this time grows with the queue's depth.
    """
    durations = []
    for _ in range(calls):
        started = time.perf_counter()
        queue_depths(sqs, queue_url)
        durations.append(time.perf_counter() - started)
    durations.sort()
    return 1000 * durations[len(durations) // 2]


def queue_depths(sqs: Any, queue_url: str) -> dict[str, int]:
    """Return the queue's visible, in-flight and delayed message counts."""
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return {name: int(attributes.get(name, 0)) for name in names}
