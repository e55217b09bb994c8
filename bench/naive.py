"""The baseline: drain the retry queue in one thread, one message at a time.

Per receive of up to 10 messages, each message is parsed, its trip item is
read (``GetItem``), the event is written with the same conditional
``UpdateItem`` request the product sends (``build_update``), and the
message is deleted on its own (``DeleteMessage``). This is the consumer a
first version would have, and the replay job must beat it by a wide margin.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.envelope import parse_message
from taxi_pipeline.errors import InvalidEventError
from taxi_pipeline.writes import KEY_ATTRIBUTE, build_update

RECEIVE_BATCH = 10
RECEIVE_WAIT_SECONDS = 1


@dataclass
class NaiveResult:
    """Outcome counts and duration of one naive drain."""

    messages: int
    seconds: float
    outcomes: Counter = field(default_factory=Counter)

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data."""
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "messages_per_second": round(self.messages_per_second, 1),
            "outcomes": dict(self.outcomes),
        }


def drain_naively(
    settings: AwsSettings,
    queue_url: str,
    table_name: str,
    expected_messages: int,
    time_limit_seconds: float,
) -> NaiveResult:
    """Drain the queue message by message until ``expected_messages`` are deleted.

    The clock runs from the first receive to the last delete. The drain also
    stops at the first empty receive or at ``time_limit_seconds``, and the
    rate is then over the messages handled so far.
    """
    sqs = settings.client("sqs")
    dynamodb = settings.client("dynamodb")
    outcomes: Counter = Counter()
    handled = 0

    started = time.perf_counter()
    deadline = started + time_limit_seconds
    while handled < expected_messages and time.perf_counter() < deadline:
        response = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=RECEIVE_BATCH,
            WaitTimeSeconds=RECEIVE_WAIT_SECONDS,
        )
        messages = response.get("Messages", [])
        if not messages:
            break
        for message in messages:
            outcomes[_apply(dynamodb, table_name, message["Body"])] += 1
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            handled += 1

    return NaiveResult(messages=handled, seconds=time.perf_counter() - started, outcomes=outcomes)


def _apply(dynamodb: Any, table_name: str, body: str) -> str:
    """Read the trip item, write the event, and return the outcome's name."""
    try:
        event = parse_message(body)
    except InvalidEventError:
        return "invalid"

    dynamodb.get_item(TableName=table_name, Key={KEY_ATTRIBUTE: {"S": event.trip_id}})
    try:
        dynamodb.update_item(**build_update(event, table_name))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return "not_newer"
        raise
    return "applied"
