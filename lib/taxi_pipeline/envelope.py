"""The retry-queue message envelope, version 1.

When a stream function cannot write a valid event, it sends the whole event
to the retry queue inside this JSON envelope::

    {
      "envelope_version": 1,
      "event_kind": "start" | "end",
      "event": "<the record's data exactly as received, UTF-8 text>",
      "error": {"class": "RetryableWriteError", "reason": "throttled",
                "code": "ProvisionedThroughputExceededException", "message": "..."},
      "source": {"stream_arn": "...", "shard_id": "...", "sequence_number": "...",
                 "event_id": "...", "approximate_arrival_timestamp": 1700000000.123},
      "function_name": "end-taxi-trips",
      "failed_at": "2026-01-01T00:00:00.000000+00:00"
    }

The event is kept as text rather than re-encoded, so its numbers reach the
replay job digit for digit. The replay job also accepts a bare event body
(a JSON trip event with no envelope) and then infers its kind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from taxi_pipeline.errors import InvalidEventError, WriteError
from taxi_pipeline.events import MAX_EVENT_BYTES, EventKind, TripEvent, decode_body, parse_event

ENVELOPE_VERSION = 1
# The envelope adds metadata and JSON escapes to an event of up to
# MAX_EVENT_BYTES, so it gets its own cap, well below SQS's 256 KiB.
MAX_ENVELOPE_BYTES = 4 * MAX_EVENT_BYTES
# Characters that SQS rejects in message bodies and string attribute values:
# it accepts #x9, #xA, #xD, #x20 to #xD7FF, #xE000 to #xFFFD and #x10000 to #x10FFFF.
SQS_REJECTED_CHARACTERS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
VERSION_KEY = "envelope_version"
MAX_ERROR_MESSAGE_LENGTH = 1024


@dataclass(frozen=True)
class RetryMessage:
    """A retry-queue message opened but not yet validated as a trip event."""

    kind: EventKind | None
    event: str | dict[str, Any]
    envelope: dict[str, Any] | None

    def parse(self) -> TripEvent:
        """Validate the carried event; raise ``InvalidEventError`` if it is not a valid trip event."""
        return parse_event(self.event, self.kind)


def build_envelope(
    kind: EventKind,
    event_body: bytes | str,
    error: BaseException,
    source: dict[str, Any],
    *,
    function_name: str | None = None,
    failed_at: datetime | None = None,
) -> str:
    """Return the envelope JSON for an event whose write failed."""
    text = event_body.decode("utf-8") if isinstance(event_body, bytes) else event_body
    envelope = {
        VERSION_KEY: ENVELOPE_VERSION,
        "event_kind": EventKind(kind).value,
        "event": text,
        "error": describe_error(error),
        "source": source,
        "function_name": function_name,
        "failed_at": (failed_at or datetime.now(UTC)).isoformat(),
    }
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


def escape_for_sqs(document: str) -> str:
    """Replace characters that SQS rejects in a JSON document by ``\\uXXXX`` escapes.

    Outside its strings, JSON allows only ASCII, and tab, newline and carriage
    return are the only control characters it allows there, which SQS
    accepts. Every rejected character is therefore inside a string, where the
    escape stands for the same character, so the parsed document is unchanged.
    """
    return SQS_REJECTED_CHARACTERS.sub(lambda match: f"\\u{ord(match.group()):04x}", document)


def describe_error(error: BaseException) -> dict[str, Any]:
    """Summarise an exception for an envelope or a dead-letter message."""
    return {
        "class": type(error).__name__,
        "reason": getattr(error, "reason", None),
        "code": getattr(error, "code", None) if isinstance(error, WriteError) else None,
        "message": str(error)[:MAX_ERROR_MESSAGE_LENGTH],
    }


def open_message(body: bytes | str) -> RetryMessage:
    """Open a retry-queue message body: an envelope of version 1 or a bare event."""
    document = decode_body(body, max_bytes=MAX_ENVELOPE_BYTES)
    if VERSION_KEY not in document:
        size = len(body.encode("utf-8", "surrogatepass")) if isinstance(body, str) else len(body)
        if size > MAX_EVENT_BYTES:
            decode_body(body)  # a bare event has the event's own limit: raises body_too_large
        return RetryMessage(kind=None, event=document, envelope=None)

    version = document[VERSION_KEY]
    if isinstance(version, bool) or version != ENVELOPE_VERSION or str(version) != str(ENVELOPE_VERSION):
        raise InvalidEventError(
            "envelope_version_unsupported",
            f"envelope_version {version!r} ({type(version).__name__}) is not supported: "
            f"this job reads the number {ENVELOPE_VERSION}",
        )

    kind_value = document.get("event_kind")
    try:
        kind = EventKind(kind_value)
    except ValueError as exc:
        raise InvalidEventError(
            "envelope_invalid", f"event_kind {kind_value!r} is invalid, expected 'start' or 'end'"
        ) from exc

    event = document.get("event")
    if not isinstance(event, str | dict):
        raise InvalidEventError("envelope_invalid", "envelope has no event text")
    if isinstance(event, str) and len(event.encode("utf-8", "surrogatepass")) > MAX_EVENT_BYTES:
        decode_body(event)  # raises body_too_large with the event's size
    metadata = {key: value for key, value in document.items() if key != "event"}
    return RetryMessage(kind=kind, event=event, envelope=metadata)


def parse_message(body: bytes | str) -> TripEvent:
    """Open and validate a retry-queue message in one step."""
    return open_message(body).parse()
