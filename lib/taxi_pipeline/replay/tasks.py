"""Spark task bodies of the replay job: receive, write and settle, dead-letter.

Each function runs on an executor. It builds its own boto3 clients from plain
``AwsSettings`` (a client cannot be pickled, and one captured from the driver
would be shared across processes) and returns counts, never records, so the
driver's memory does not grow with the queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.errors import PermanentWriteError, RetryableWriteError
from taxi_pipeline.events import event_from_json
from taxi_pipeline.replay.queue import (
    SQS_BATCH_SIZE,
    DeadLetter,
    ReceiveQuota,
    VisibilityKeeper,
    change_visibility,
    delete_messages,
    receive_messages,
    send_dead_letters,
)
from taxi_pipeline.writes import TripWriter, WriteOutcome

logger = logging.getLogger(__name__)

MAX_TASK_SAMPLES = 5


@dataclass(frozen=True)
class QueueTarget:
    """The queues a task reads and settles messages on, with their timeouts."""

    queue_url: str
    dead_letter_queue_url: str | None
    visibility_timeout: int
    retry_delay_seconds: int


def _client_settings(settings: AwsSettings, threads: int) -> AwsSettings:
    # A pool with a connection per thread, so threads do not wait for one.
    return replace(settings, max_pool_connections=max(settings.max_pool_connections, threads + 2))


def receive_task(
    settings: AwsSettings, queue_url: str, quota: ReceiveQuota, tasks: int, counters: Any = None
):
    """Return a ``mapPartitionsWithIndex`` function that receives one task's share of a wave.

    ``quota.max_messages`` is the whole wave's budget; task ``index`` of
    ``tasks`` receives its share, so the wave never exceeds the budget.
    """

    def receive(index: int, _: Iterable[Any]) -> Iterator[tuple]:
        share = quota.max_messages // tasks + (1 if index < quota.max_messages % tasks else 0)
        if share == 0:
            return
        sqs = _client_settings(settings, quota.threads).client("sqs")
        messages, counts = receive_messages(sqs, queue_url, replace(quota, max_messages=share))
        if counters is not None:
            counters.add(dict(counts))
        for message in messages:
            yield (
                message.message_id,
                message.receipt_handle,
                message.body,
                message.receive_count,
                message.sent_timestamp_ms,
                message.received_at,
            )

    return receive


class _Tally:
    """Thread-safe counts and samples of one task."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.reasons: Counter = Counter()
        self.samples: list[dict[str, Any]] = []

    def add(self, outcome: str | None = None, n: int = 1, reason: str | None = None, **counts: int) -> None:
        with self.lock:
            if outcome:
                self.outcomes[outcome] += n
            if reason:
                self.reasons[reason] += n
            self.counts.update(counts)

    def sample(self, **fields: Any) -> None:
        with self.lock:
            if len(self.samples) < MAX_TASK_SAMPLES:
                self.samples.append(fields)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "outcomes": dict(self.outcomes),
            "reasons": dict(self.reasons),
            "samples": self.samples,
        }


class _Deleter:
    """Buffers receipt handles and deletes them in full batches of 10."""

    def __init__(self, sqs: Any, queue_url: str, keeper: VisibilityKeeper | None, tally: _Tally) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.keeper = keeper
        self.tally = tally
        self.lock = threading.Lock()
        self.pending: list[str] = []

    def add(self, handles: Iterable[str]) -> None:
        ready: list[str] = []
        with self.lock:
            self.pending.extend(handles)
            if len(self.pending) >= SQS_BATCH_SIZE:
                cut = len(self.pending) - len(self.pending) % SQS_BATCH_SIZE
                ready, self.pending = self.pending[:cut], self.pending[cut:]
        if ready:
            self._delete(ready)

    def flush(self) -> None:
        with self.lock:
            ready, self.pending = self.pending, []
        if ready:
            self._delete(ready)

    def _delete(self, handles: list[str]) -> None:
        deleted, failed = delete_messages(self.sqs, self.queue_url, handles)
        if self.keeper is not None:
            self.keeper.release(handles)
        self.tally.add(messages_deleted=deleted, delete_failed=len(failed))
        for entry in failed[:MAX_TASK_SAMPLES]:
            self.tally.sample(problem="delete_failed", code=entry.get("Code"), message=entry.get("Message"))


def _trips(rows: Iterable[Any]) -> list[list[Any]]:
    """Group consecutive rows of one trip; rows arrive sorted by trip id."""
    return [list(group) for _, group in itertools.groupby(rows, key=lambda row: row["trip_id"])]


def write_task(
    settings: AwsSettings,
    table_name: str,
    threads: int,
    target: QueueTarget | None = None,
):
    """Return a ``mapPartitions`` function that writes a partition's trips.

    With a ``target`` the rows carry queue messages, which are settled after
    each write: deleted once the event is in, hidden for
    ``retry_delay_seconds`` after a retryable failure, copied to the
    dead-letter queue and then deleted after a permanent one. Without a
    target (a backfill) only the counts are returned.
    """

    def write(rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        client_settings = _client_settings(settings, threads)
        writer = TripWriter(table_name, settings=client_settings)
        tally = _Tally()
        trips = _trips(rows)
        if not trips:
            yield tally.as_dict()
            return

        sqs = keeper = deleter = None
        if target is not None:
            sqs = client_settings.client("sqs")
            keeper = VisibilityKeeper(
                sqs, target.queue_url, target.visibility_timeout, target.visibility_timeout / 3
            )
            for trip in trips:
                for row in trip:
                    for message in row["messages"]:
                        keeper.track(message["receipt_handle"], message["received_at"])
            deleter = _Deleter(sqs, target.queue_url, keeper, tally)

        def write_trip(trip: list[Any]) -> None:
            for row in trip:
                _write_one(writer, row, tally, target, sqs, deleter, keeper)

        if keeper is not None:
            keeper.extend_due()
            with keeper, ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(write_trip, trips))
                deleter.flush()
            tally.add(
                visibility_extended=keeper.extended,
                visibility_extension_failed=keeper.extension_failures,
            )
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(write_trip, trips))

        tally.add(trips=len(trips), events=sum(len(trip) for trip in trips))
        yield tally.as_dict()

    return write


def _write_one(writer, row, tally: _Tally, target, sqs, deleter, keeper) -> None:
    event = event_from_json(row["event_json"])
    copies = row["copies"]
    try:
        result = writer.apply(event)
    except RetryableWriteError as exc:
        tally.add("retry_later", copies, reason=f"write_{exc.reason}")
        tally.sample(
            problem="retryable_write_failure",
            trip_id=event.trip_id,
            reason=exc.reason,
            code=exc.code,
        )
        if target is not None:
            handles = [message["receipt_handle"] for message in row["messages"]]
            keeper.release(handles)
            changed, failed = change_visibility(sqs, target.queue_url, handles, target.retry_delay_seconds)
            tally.add(retry_delay_set=changed, retry_delay_failed=failed)
        return
    except PermanentWriteError as exc:
        tally.sample(
            problem="permanent_write_failure",
            trip_id=event.trip_id,
            reason=exc.reason,
            code=exc.code,
        )
        if target is None:
            tally.add("rejected", copies, reason=f"write_{exc.reason}")
            return
        letters = [
            DeadLetter(
                message_id=message["message_id"],
                receipt_handle=message["receipt_handle"],
                body=message["body"],
                reason=f"write_{exc.reason}",
                detail=exc.detail,
                trip_id=event.trip_id,
                receive_count=message["receive_count"],
            )
            for message in row["messages"]
        ]
        _dead_letter(sqs, target, letters, deleter, keeper, tally)
        return

    outcome = result.outcome.value
    tally.add(outcome)
    if copies > 1:
        tally.add(WriteOutcome.DUPLICATE.value, copies - 1, collapsed_copies=copies - 1)
    if event.ignored_fields:
        tally.add(ignored_fields=len(event.ignored_fields) * copies)
    if deleter is not None:
        deleter.add(message["receipt_handle"] for message in row["messages"])


def _dead_letter(sqs, target: QueueTarget, letters: list[DeadLetter], deleter, keeper, tally: _Tally) -> None:
    """Copy letters to the dead-letter queue; delete from the source only those copied."""
    if not target.dead_letter_queue_url:
        tally.add("retry_later", len(letters), reason="no_dead_letter_queue")
        return
    sent, failed = send_dead_letters(sqs, target.dead_letter_queue_url, letters)
    for letter in sent:
        tally.add("dead_lettered", reason=letter.reason)
    if sent:
        deleter.add(letter.receipt_handle for letter in sent)
    if failed:
        tally.add("retry_later", len(failed), reason="dead_letter_send_failed")
        handles = [letter.receipt_handle for letter in failed]
        keeper.release(handles)
        change_visibility(sqs, target.queue_url, handles, target.retry_delay_seconds)


def dead_letter_task(settings: AwsSettings, target: QueueTarget):
    """Return a ``mapPartitions`` function that dead-letters invalid messages, then deletes them."""

    def dead_letter(rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        tally = _Tally()
        letters = [
            DeadLetter(
                message_id=row["message_id"],
                receipt_handle=row["receipt_handle"],
                body=row["body"],
                reason=row["reason"],
                detail=row["detail"] or "",
                trip_id=row["trip_id"],
                receive_count=row["receive_count"],
            )
            for row in rows
        ]
        if letters:
            sqs = _client_settings(settings, 2).client("sqs")
            deleter = _Deleter(sqs, target.queue_url, None, tally)
            keeper = VisibilityKeeper(sqs, target.queue_url, target.visibility_timeout, 0)
            _dead_letter(sqs, target, letters, deleter, keeper, tally)
            deleter.flush()
            for letter in letters[:MAX_TASK_SAMPLES]:
                tally.sample(problem="invalid_message", message_id=letter.message_id, reason=letter.reason)
        yield tally.as_dict()

    return dead_letter


def release_task(settings: AwsSettings, queue_url: str):
    """Return a ``foreachPartition`` function that makes messages visible again (dry run)."""

    def release(rows: Iterable[Any]) -> None:
        handles = [row["receipt_handle"] for row in rows]
        if handles:
            change_visibility(_client_settings(settings, 2).client("sqs"), queue_url, handles, 0)

    return release
