"""Idempotent, order-independent trip writes to DynamoDB.

Each event becomes one conditional ``UpdateItem`` with no read before it:

* The event's fields are set, and its fields without a value are removed, so
  the newest event of a kind fully defines that kind's attributes.
* ``start_revision`` or ``end_revision`` stores the revision of the event
  that wrote them. The condition ``attribute_not_exists(rev) OR rev < :rev``
  lets only a newer revision through, so a repeated or older event changes
  nothing, whatever order events arrive in.
* ``trip_status`` is ``ended`` once any end event is in. A start event only
  sets ``started`` where no status exists, so a late start never turns an
  ended trip back to started.

A failed condition means "already applied" (same revision) or "stale"
(older revision) and counts as success. Every other failure is raised as a
``RetryableWriteError`` or a ``PermanentWriteError``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.errors import PermanentWriteError, RetryableWriteError
from taxi_pipeline.events import REVISION_ATTRIBUTE, EventKind, TripEvent

logger = logging.getLogger(__name__)

KEY_ATTRIBUTE = "trip_id"
STATUS_ATTRIBUTE = "trip_status"
STATUS_STARTED = "started"
STATUS_ENDED = "ended"

_serializer = TypeSerializer()

_RETRYABLE_CODES = {
    "ProvisionedThroughputExceededException": "throttled",
    "ThrottlingException": "throttled",
    "RequestLimitExceeded": "throttled",
    "LimitExceededException": "throttled",
    "TransactionConflictException": "conflict",
    "InternalServerError": "service_error",
    "ServiceUnavailable": "service_error",
    # A missing table or a missing permission is a deployment fault, not a
    # fault of the event: the event must wait until it is fixed.
    "ResourceNotFoundException": "table_not_found",
    "AccessDeniedException": "access_denied",
    "UnrecognizedClientException": "access_denied",
    "ExpiredTokenException": "access_denied",
}
_NETWORK_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)


class WriteOutcome(enum.StrEnum):
    """The effect of a successful write on the item."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True)
class WriteResult:
    """The outcome of one trip write."""

    trip_id: str
    kind: EventKind
    outcome: WriteOutcome


def build_update(event: TripEvent, table_name: str) -> dict[str, Any]:
    """Build the ``UpdateItem`` request for one event.

    Every attribute name goes through an expression alias (``#a0``, ...), so
    reserved words and names with dots or dashes are safe.
    """
    names: dict[str, str] = {}
    values: dict[str, Any] = {}
    set_clauses: list[str] = []
    remove_clauses: list[str] = []

    for index, (name, value) in enumerate(sorted(event.attributes.items())):
        alias = f"#a{index}"
        names[alias] = name
        if value is None:
            remove_clauses.append(alias)
        else:
            values[f":a{index}"] = _serializer.serialize(value)
            set_clauses.append(f"{alias} = :a{index}")

    names["#rev"] = REVISION_ATTRIBUTE[event.kind]
    values[":rev"] = {"S": event.revision}
    set_clauses.append("#rev = :rev")

    names["#status"] = STATUS_ATTRIBUTE
    if event.kind is EventKind.END:
        values[":status"] = {"S": STATUS_ENDED}
        set_clauses.append("#status = :status")
    else:
        values[":status"] = {"S": STATUS_STARTED}
        set_clauses.append("#status = if_not_exists(#status, :status)")

    expression = "SET " + ", ".join(set_clauses)
    if remove_clauses:
        expression += " REMOVE " + ", ".join(remove_clauses)

    return {
        "TableName": table_name,
        "Key": {KEY_ATTRIBUTE: {"S": event.trip_id}},
        "UpdateExpression": expression,
        "ConditionExpression": "attribute_not_exists(#rev) OR #rev < :rev",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


class TripWriter:
    """Apply trip events to the trip table, one conditional update each.

    The writer keeps one boto3 DynamoDB client, which is thread-safe, so one
    writer serves many threads. Build writers where they run (per Lambda
    container, per Spark task) from plain ``AwsSettings``.
    """

    def __init__(self, table_name: str, client: Any = None, settings: AwsSettings | None = None) -> None:
        if not table_name:
            raise ValueError("table_name is empty: set the DynamoDB table of the trips")
        self.table_name = table_name
        self.client = (
            client if client is not None else (settings or AwsSettings.from_env()).client("dynamodb")
        )

    def apply(self, event: TripEvent) -> WriteResult:
        """Write one event; return APPLIED, DUPLICATE or STALE, or raise a ``WriteError``."""
        request = build_update(event, self.table_name)
        try:
            self.client.update_item(**request)
        except ClientError as exc:
            return self._classify_client_error(event, exc)
        except _NETWORK_ERRORS as exc:
            raise RetryableWriteError(
                event.trip_id, "network_error", str(exc), code=type(exc).__name__
            ) from exc
        except BotoCoreError as exc:
            raise RetryableWriteError(
                event.trip_id, "client_error", str(exc), code=type(exc).__name__
            ) from exc
        return WriteResult(event.trip_id, event.kind, WriteOutcome.APPLIED)

    def _classify_client_error(self, event: TripEvent, exc: ClientError) -> WriteResult:
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "")

        if code == "ConditionalCheckFailedException":
            return WriteResult(event.trip_id, event.kind, _condition_outcome(event, exc))

        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _RETRYABLE_CODES:
            raise RetryableWriteError(event.trip_id, _RETRYABLE_CODES[code], message, code=code) from exc
        if status >= 500:
            raise RetryableWriteError(event.trip_id, "service_error", message or code, code=code) from exc
        if code == "ValidationException" and "size" in message.lower():
            raise PermanentWriteError(event.trip_id, "item_too_large", message, code=code) from exc
        raise PermanentWriteError(event.trip_id, "write_rejected", f"{code}: {message}", code=code) from exc


def _condition_outcome(event: TripEvent, exc: ClientError) -> WriteOutcome:
    """Tell a repeat of the stored revision from an older one, using the returned old item."""
    stored = exc.response.get("Item", {}).get(REVISION_ATTRIBUTE[event.kind], {}).get("S")
    if stored == event.revision:
        return WriteOutcome.DUPLICATE
    return WriteOutcome.STALE
