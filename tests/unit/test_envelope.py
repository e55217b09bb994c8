"""The retry-queue envelope: size limits, versions and bare bodies."""

from __future__ import annotations

import json

import pytest

from taxi_pipeline.envelope import build_envelope, escape_for_sqs, open_message, parse_message
from taxi_pipeline.errors import InvalidEventError, RetryableWriteError
from taxi_pipeline.events import MAX_EVENT_BYTES, EventKind


def event_of_size(size: int) -> str:
    body = {"trip_id": "big", "end_time_local": "2023/01/23 06:49:34 AM", "note": ""}
    padding = size - len(json.dumps(body))
    body["note"] = '"' * (padding // 2)  # each quote is escaped, so the envelope grows more than the event
    return json.dumps(body)


def wrap(event: str) -> str:
    error = RetryableWriteError("big", "throttled", "slow down")
    return build_envelope(EventKind.END, event, error, {"sequence_number": "1"})


def test_envelope_of_largest_event_still_opens():
    event = event_of_size(MAX_EVENT_BYTES - 100)
    envelope = wrap(event)
    assert len(envelope.encode()) > MAX_EVENT_BYTES
    assert parse_message(envelope).trip_id == "big"


def test_oversized_event_inside_envelope_is_rejected():
    with pytest.raises(InvalidEventError) as caught:
        parse_message(wrap(event_of_size(MAX_EVENT_BYTES + 100)))
    assert caught.value.reason == "body_too_large"


def test_oversized_bare_body_is_rejected():
    with pytest.raises(InvalidEventError) as caught:
        open_message(event_of_size(MAX_EVENT_BYTES + 100))
    assert caught.value.reason == "body_too_large"


@pytest.mark.parametrize("version", ['"1"', "true", "1.0", "2"])
def test_other_envelope_versions_are_rejected(version):
    body = '{"envelope_version": ' + version + ', "event_kind": "end", "event": "{}"}'
    with pytest.raises(InvalidEventError) as caught:
        open_message(body)
    assert caught.value.reason == "envelope_version_unsupported"
    assert "is not supported" in caught.value.detail


def test_escape_keeps_json_meaning():
    document = json.dumps({"a": "x\ufffey"}, ensure_ascii=False)
    escaped = escape_for_sqs(document)
    assert "\ufffe" not in escaped
    assert json.loads(escaped) == {"a": "x\ufffey"}
