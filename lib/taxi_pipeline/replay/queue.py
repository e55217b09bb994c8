"""SQS operations of the replay job: receive, delete, extend visibility, dead-letter.

Everything here runs inside Spark tasks and uses plain boto3, so it is also
usable and testable without Spark. Every batch call is checked entry by
entry: an entry in ``Failed`` is logged and counted, never treated as done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from taxi_pipeline.envelope import escape_for_sqs

logger = logging.getLogger(__name__)

SQS_BATCH_SIZE = 10  # the maximum entries of any SQS batch call
MAX_VISIBILITY_TIMEOUT = 12 * 60 * 60  # SQS caps a message's visibility at 12 hours
MAX_ATTRIBUTE_VALUE_LENGTH = 1024
# Long-poll wait once a poller has received messages in this wave. One second
# still queries every SQS server, unlike a short poll (wait 0), which samples some.
FOLLOW_UP_WAIT_SECONDS = 1


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as received, with the local time it was received at."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_timestamp_ms: int
    received_at: float


@dataclass
class ReceiveQuota:
    """The polling limits of one receive task: its message budget, waits and deadline."""

    max_messages: int
    wait_time_seconds: int
    visibility_timeout: int
    max_empty_polls: int = 1
    threads: int = 4
    deadline: float | None = None


def receive_messages(sqs: Any, queue_url: str, quota: ReceiveQuota) -> tuple[list[ReceivedMessage], Counter]:
    """Receive up to ``quota.max_messages`` messages with concurrent long polls.

    Each thread polls for 10 messages at a time and stops after
    ``max_empty_polls`` empty responses in a row, when the budget is spent, or at
    the deadline. Its first poll waits ``wait_time_seconds``, later ones
    ``FOLLOW_UP_WAIT_SECONDS``, so a wave does not idle on a drained queue.
    Returns the messages, deduplicated by message id, and counts.
    """
    lock = threading.Lock()
    received: dict[str, ReceivedMessage] = {}
    counts: Counter = Counter()
    budget = [quota.max_messages]

    def take_budget() -> int:
        with lock:
            size = min(SQS_BATCH_SIZE, budget[0])
            budget[0] -= size
            return size

    def give_back(unused: int) -> None:
        with lock:
            budget[0] += unused

    def poll() -> None:
        empty_polls = 0
        wait = quota.wait_time_seconds
        while empty_polls < quota.max_empty_polls:
            if quota.deadline is not None and time.time() >= quota.deadline:
                return
            size = take_budget()
            if size <= 0:
                return
            try:
                response = sqs.receive_message(
                    QueueUrl=queue_url,
                    MaxNumberOfMessages=size,
                    WaitTimeSeconds=wait,
                    VisibilityTimeout=quota.visibility_timeout,
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                )
            except (ClientError, BotoCoreError) as exc:
                give_back(size)
                with lock:
                    counts["receive_errors"] += 1
                logger.warning("receive from %s failed: %s", queue_url, exc)
                empty_polls += 1
                continue

            messages = response.get("Messages", [])
            give_back(size - len(messages))
            now = time.time()
            with lock:
                counts["receive_calls"] += 1
                for message in messages:
                    if message["MessageId"] in received:
                        # Only the newest receipt handle can delete the message.
                        counts["received_twice"] += 1
                    received[message["MessageId"]] = _to_received(message, now)
            empty_polls = 0 if messages else empty_polls + 1
            if messages:
                # The queue had messages a moment ago, so a short wait is enough to
                # find more. Only the first poll waits the full time.
                wait = min(wait, FOLLOW_UP_WAIT_SECONDS)

    threads = max(1, min(quota.threads, -(-quota.max_messages // SQS_BATCH_SIZE)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(poll) for _ in range(threads)]:
            future.result()

    return list(received.values()), counts


def _to_received(message: dict[str, Any], received_at: float) -> ReceivedMessage:
    attributes = message.get("Attributes", {})
    return ReceivedMessage(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        body=message.get("Body", ""),
        receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
        sent_timestamp_ms=int(attributes.get("SentTimestamp", "0")),
        received_at=received_at,
    )


def chunks(items: list, size: int = SQS_BATCH_SIZE) -> Iterator[list]:
    """Yield consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def delete_messages(sqs: Any, queue_url: str, receipt_handles: Iterable[str]) -> tuple[int, list[dict]]:
    """Delete messages in batches of 10; return the number deleted and the failed entries.

    A failed entry (for example an expired receipt handle) is logged and
    returned, never counted as deleted: the message comes back later and its
    idempotent write makes the repeat harmless.
    """
    deleted = 0
    failed: list[dict] = []
    for batch in chunks(list(receipt_handles)):
        entries = [{"Id": str(index), "ReceiptHandle": handle} for index, handle in enumerate(batch)]
        try:
            response = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("delete of %d messages from %s failed: %s", len(entries), queue_url, exc)
            failed.extend(
                {"Id": entry["Id"], "Code": type(exc).__name__, "Message": str(exc)} for entry in entries
            )
            continue
        deleted += len(response.get("Successful", []))
        for entry in response.get("Failed", []):
            logger.warning(
                "delete from %s failed for entry %s: %s %s",
                queue_url,
                entry.get("Id"),
                entry.get("Code"),
                entry.get("Message"),
            )
            failed.append(entry)
    return deleted, failed


def change_visibility(
    sqs: Any, queue_url: str, receipt_handles: Iterable[str], timeout: int
) -> tuple[int, int]:
    """Set the visibility timeout of messages in batches of 10; return (changed, failed)."""
    timeout = max(0, min(int(timeout), MAX_VISIBILITY_TIMEOUT))
    changed = failed = 0
    for batch in chunks(list(receipt_handles)):
        entries = [
            {"Id": str(index), "ReceiptHandle": handle, "VisibilityTimeout": timeout}
            for index, handle in enumerate(batch)
        ]
        try:
            response = sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("visibility change of %d messages on %s failed: %s", len(entries), queue_url, exc)
            failed += len(entries)
            continue
        changed += len(response.get("Successful", []))
        failed += len(response.get("Failed", []))
    return changed, failed


@dataclass(frozen=True)
class DeadLetter:
    """A message to copy to the dead-letter queue, with the reason it cannot be applied."""

    message_id: str
    receipt_handle: str
    body: str
    reason: str
    detail: str
    trip_id: str | None = None
    receive_count: int = 1


def send_dead_letters(sqs: Any, dead_letter_queue_url: str, letters: list[DeadLetter]) -> tuple[list, list]:
    """Copy messages to the dead-letter queue with their reason as message attributes.

    Returns ``(sent, failed)`` lists of ``DeadLetter``. Only a sent letter may
    be deleted from the source queue.
    """
    sent: list[DeadLetter] = []
    failed: list[DeadLetter] = []
    for batch in chunks(letters):
        entries = [
            {
                "Id": str(index),
                "MessageBody": letter.body or "(empty body)",
                "MessageAttributes": _dead_letter_attributes(letter),
            }
            for index, letter in enumerate(batch)
        ]
        try:
            response = sqs.send_message_batch(QueueUrl=dead_letter_queue_url, Entries=entries)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("dead-letter send of %d messages failed: %s", len(entries), exc)
            failed.extend(batch)
            continue
        succeeded = {entry["Id"] for entry in response.get("Successful", [])}
        for entry in response.get("Failed", []):
            logger.warning("dead-letter send failed for entry %s: %s", entry.get("Id"), entry.get("Code"))
        for index, letter in enumerate(batch):
            (sent if str(index) in succeeded else failed).append(letter)
    return sent, failed


def _dead_letter_attributes(letter: DeadLetter) -> dict[str, dict[str, str]]:
    attributes = {
        "reason": letter.reason,
        "detail": letter.detail,
        "source_message_id": letter.message_id,
        "receive_count": str(letter.receive_count),
        "trip_id": letter.trip_id,
    }
    return {
        name: {"DataType": "String", "StringValue": escape_for_sqs(value[:MAX_ATTRIBUTE_VALUE_LENGTH])}
        for name, value in attributes.items()
        if value
    }


@dataclass
class VisibilityKeeper:
    """Extend the visibility of messages still in work, from a background thread.

    A message received with visibility timeout ``timeout`` is extended by
    another ``timeout`` seconds once less than ``margin`` seconds of it are
    left, until ``release`` removes it (deleted or given up on). This keeps a
    message from reappearing while its wave still works on it.
    """

    sqs: Any
    queue_url: str
    timeout: int
    margin: float
    check_interval: float = 5.0
    _deadlines: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    extended: int = 0
    extension_failures: int = 0

    def track(self, receipt_handle: str, received_at: float) -> None:
        with self._lock:
            self._deadlines[receipt_handle] = received_at + self.timeout

    def release(self, receipt_handles: Iterable[str]) -> None:
        with self._lock:
            for handle in receipt_handles:
                self._deadlines.pop(handle, None)

    def extend_due(self, now: float | None = None) -> None:
        """Extend every tracked message whose visibility ends within the margin."""
        now = time.time() if now is None else now
        with self._lock:
            due = [handle for handle, deadline in self._deadlines.items() if deadline - now < self.margin]
        if not due:
            return
        changed, failed = change_visibility(self.sqs, self.queue_url, due, self.timeout)
        with self._lock:
            for handle in due:
                if handle in self._deadlines:
                    self._deadlines[handle] = now + self.timeout
            self.extended += changed
            self.extension_failures += failed
        logger.info("extended visibility of %d messages (%d failed)", changed, failed)

    def __enter__(self) -> VisibilityKeeper:
        def run() -> None:
            while not self._stop.wait(self.check_interval):
                self.extend_due()

        self._thread = threading.Thread(target=run, name="visibility-keeper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def queue_counts(sqs: Any, queue_url: str) -> dict[str, int]:
    """Return the queue's approximate visible, in-flight and delayed message counts."""
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return {name: int(attributes.get(name, 0)) for name in names}


def dead_letter_queue_of(sqs: Any, queue_url: str) -> str | None:
    """Return the URL of the queue's redrive target, or ``None`` if it has no redrive policy."""
    import json

    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])["Attributes"]
    policy = attributes.get("RedrivePolicy")
    if not policy:
        return None
    target_arn = json.loads(policy)["deadLetterTargetArn"]
    _, _, _, _, account, name = target_arn.split(":", 5)
    try:
        return sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
    except ClientError as exc:
        raise ValueError(
            f"the dead-letter queue {target_arn} named in the redrive policy of {queue_url} "
            f"cannot be found ({exc.response.get('Error', {}).get('Code')}): create it, or pass "
            "--dead_letter_queue_url"
        ) from exc


def check_queue_exists(sqs: Any, queue_url: str, role: str) -> None:
    """Raise ``ValueError`` naming the queue and its role when it cannot be reached."""
    try:
        sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        raise ValueError(
            f"the {role} {queue_url} cannot be used ({code}): check the URL and permissions"
        ) from exc
