"""Unit tests of the run verification: expected items, table comparison, queue checks."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from taxi_pipeline.tooling.verify import (
    NUMBER,
    TEXT,
    TIMESTAMP,
    CheckResult,
    ExpectedRejection,
    QueueMessage,
    VerificationReport,
    check_invalid_events,
    check_queue,
    compare_table,
    expected_items,
    expected_value,
)

REVISION = "00000000000000000000:" + "a" * 64


def start_row(trip_id: str = "trip-1", **fields) -> dict:
    row = {
        "trip_id": trip_id,
        "start_time_local": "2023/01/23 06:37:21 AM",
        "vehicle_placard_number": 448,
        "driver_id": "-",
        "pickup_location_latitude": 37.794,
        "pickup_location_longitude": -122.396,
        "dropoff_location_latitude": None,
        "dropoff_location_longitude": None,
        "hail_type": "street",
        "upfront_pricing": None,
    }
    row.update(fields)
    return row


def end_row(trip_id: str = "trip-1", **fields) -> dict:
    row = {
        "trip_id": trip_id,
        "end_time_local": "2023/07/04 09:15:00 PM",
        "fare_type": "meter_fare",
        "meter_fare_amount": 13.25,
        "promo_rate": None,
        "tolls": 0.0,
        "sf_exit_fee": None,
        "other_fees": None,
        "tip": 30.4,
        "extra_amount": None,
        "total_fare_amount": 43.65,
        "fare_time_milliseconds": "2,081,284",
        "trip_distance_meters": "2,735.8848",
        "qa_flags": "LP-OI-",
        "paratransit": 0.0,
    }
    row.update(fields)
    return row


def stored_item(trip_id: str = "trip-1") -> dict:
    """Return the item for ``start_row()`` and ``end_row()``, written out by hand."""
    return {
        "trip_id": trip_id,
        "start_time_local": "2023-01-23T06:37:21-08:00",
        "vehicle_placard_number": "448",
        "pickup_location_latitude": Decimal("37.794"),
        "pickup_location_longitude": Decimal("-122.396"),
        "hail_type": "street",
        "end_time_local": "2023-07-04T21:15:00-07:00",
        "fare_type": "meter_fare",
        "meter_fare_amount": Decimal("13.25"),
        "tolls": Decimal("0"),
        "tip": Decimal("30.4"),
        "total_fare_amount": Decimal("43.65"),
        "fare_time_milliseconds": Decimal("2081284"),
        "trip_distance_meters": Decimal("2735.8848"),
        "qa_flags": "LP-OI-",
        "paratransit": Decimal("0"),
        "trip_status": "ended",
        "start_revision": REVISION,
        "end_revision": REVISION,
    }


def compare(actual: dict[str, dict]) -> CheckResult:
    return compare_table(expected_items([start_row()], [end_row()]), actual)


# --- Expected values -----------------------------------------------------------------


def test_portal_timestamp_gets_offset_of_its_date():
    assert expected_value(TIMESTAMP, "2023/01/23 06:37:21 AM") == "2023-01-23T06:37:21-08:00"
    assert expected_value(TIMESTAMP, "2023/07/04 12:05:00 PM") == "2023-07-04T12:05:00-07:00"
    assert expected_value(TIMESTAMP, "2023/07/04 12:05:00 AM") == "2023-07-04T00:05:00-07:00"


def test_numbers_become_exact_decimals():
    assert expected_value(NUMBER, "2,081,284") == Decimal("2081284")
    assert expected_value(NUMBER, "2,735.8848") == Decimal("2735.8848")
    assert expected_value(NUMBER, 30.4) == Decimal("30.4")
    assert expected_value(NUMBER, 0.1) == Decimal("0.1")
    assert expected_value(NUMBER, Decimal("1.10")) == Decimal("1.10")
    assert expected_value(NUMBER, 7) == Decimal(7)


def test_placeholders_and_nulls_mean_absent():
    assert expected_value(TEXT, "-") is None
    assert expected_value(TEXT, "  ") is None
    assert expected_value(TEXT, None) is None
    assert expected_value(NUMBER, None) is None
    assert expected_value(TIMESTAMP, "") is None


def test_placard_number_is_stored_as_text():
    assert expected_value(TEXT, 448) == "448"


def test_invalid_number_in_source_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        expected_value(NUMBER, "n/a")


def test_status_follows_the_end_row():
    items = expected_items([start_row("a"), start_row("b")], [end_row("b"), end_row("c")])

    assert items["a"]["trip_status"] == "started"
    assert items["b"]["trip_status"] == "ended"
    assert items["c"]["trip_status"] == "ended"
    assert "start_time_local" not in items["c"]
    assert items["a"]["_revisions"] == {"start_revision"}
    assert items["b"]["_revisions"] == {"start_revision", "end_revision"}


# --- Table comparison ----------------------------------------------------------------


def test_matching_table_passes():
    result = compare({"trip-1": stored_item()})

    assert result.passed is True
    assert result.details == []
    assert result.summary == "1 of 1 expected trips match; 1 items in the table"


def test_numbers_match_by_value():
    item = stored_item()
    item["tip"] = Decimal("30.40")

    assert compare({"trip-1": item}).passed is True


def test_missing_item_is_detected():
    result = compare({})

    assert result.passed is False
    assert result.details == ["trip trip-1: missing from the table"]


def test_extra_item_is_detected():
    result = compare({"trip-1": stored_item(), "trip-x": stored_item("trip-x")})

    assert result.passed is False
    assert result.details == ["trip trip-x: in the table, but no event of it was sent"]


def test_wrong_field_is_detected():
    item = stored_item()
    item["tip"] = Decimal("3.04")

    result = compare({"trip-1": item})

    assert result.passed is False
    assert result.details == ["trip trip-1: attribute tip is 3.04 (number), expected 30.4 (number)"]


def test_number_stored_as_text_is_detected():
    item = stored_item()
    item["meter_fare_amount"] = "13.25"

    result = compare({"trip-1": item})

    assert result.details == ["trip trip-1: attribute meter_fare_amount is '13.25', expected 13.25 (number)"]


def test_missing_field_is_detected():
    item = stored_item()
    del item["end_time_local"]

    result = compare({"trip-1": item})

    assert result.details == [
        "trip trip-1: attribute end_time_local is missing, expected '2023-07-04T21:15:00-07:00'"
    ]


def test_extra_attribute_is_detected():
    item = stored_item()
    item["driver_id"] = "A-0001"
    item["promo_rate"] = Decimal(0)

    result = compare({"trip-1": item})

    assert result.passed is False
    assert result.details == [
        "trip trip-1: extra attribute driver_id = (hidden: personal data)",
        "trip trip-1: extra attribute promo_rate = 0 (number)",
    ]


def test_wrong_status_is_detected():
    item = stored_item()
    item["trip_status"] = "started"

    result = compare({"trip-1": item})

    assert result.details == ["trip trip-1: attribute trip_status is 'started', expected 'ended'"]


@pytest.mark.parametrize(("value", "problem"), [(None, "missing"), ("7:abc", "malformed: '7:abc'")])
def test_revision_attribute_is_checked(value, problem):
    item = stored_item()
    if value is None:
        del item["end_revision"]
    else:
        item["end_revision"] = value

    result = compare({"trip-1": item})

    assert result.details == [f"trip trip-1: revision attribute end_revision is {problem}"]


def test_details_are_capped_but_all_counted():
    expected = expected_items([start_row(f"trip-{n}") for n in range(30)], [])

    result = compare_table(expected, {}, max_details=5)

    assert len(result.details) == 5
    assert result.mismatches == 30


# --- Invalid-event notifications -----------------------------------------------------


def notification(reason: str | None, sequence_number: str | None = None, body: str = "{}") -> QueueMessage:
    attributes = {"stream": "arn:aws:kinesis:us-east-1:000000000000:stream/start-trip-stream"}
    if reason is not None:
        attributes["reason"] = reason
    if sequence_number is not None:
        attributes["sequence_number"] = sequence_number
    return QueueMessage(body=body, attributes=attributes)


def rejection(reason: str, sequence_number: str | None = None) -> ExpectedRejection:
    return ExpectedRejection(
        reason=reason,
        trip_id="trip-1",
        corruption=reason,
        stream="start-trip-stream" if sequence_number else None,
        sequence_number=sequence_number,
    )


def test_notifications_matched_by_record_pass():
    expected = [rejection("body_not_json", "1"), rejection("trip_id_missing", "2")]
    received = [notification("trip_id_missing", "2"), notification("body_not_json", "1")]

    result = check_invalid_events(expected, received)

    assert result.passed is True
    assert result.summary == "2 notifications received, 2 expected"


def test_wrong_reason_for_a_record_is_detected():
    result = check_invalid_events([rejection("money_negative", "5")], [notification("wrong_type", "5")])

    assert result.passed is False
    assert result.details == [
        "money_negative (record 5 on start-trip-stream): reason wrong_type, expected money_negative"
    ]


def test_missing_notification_is_detected():
    result = check_invalid_events([rejection("body_not_utf8", "3")], [])

    assert result.details == [
        "reason body_not_utf8: 1 notification(s) missing, for body_not_utf8 (record 3 on start-trip-stream)"
    ]


def test_valid_event_rejected_by_mistake_is_detected():
    body = json.dumps({"trip_id": "trip-7"})

    result = check_invalid_events([], [notification("timestamp_invalid", "9", body)])

    assert result.passed is False
    assert result.details == ["reason timestamp_invalid: 1 unexpected notification(s), trips trip-7"]


def test_repeated_notification_is_detected():
    result = check_invalid_events(
        [rejection("trip_id_empty", "4")],
        [notification("trip_id_empty", "4"), notification("trip_id_empty", "4")],
    )

    assert result.details == ["trip_id_empty (record 4 on start-trip-stream): notified more than once"]


def test_notifications_without_record_match_by_reason():
    expected = [rejection("body_not_json"), rejection("wrong_type")]

    assert check_invalid_events(expected, [notification("wrong_type"), notification("body_not_json")]).passed
    assert not check_invalid_events(expected, [notification("wrong_type"), notification(None)]).passed


def test_sns_envelope_is_opened():
    from taxi_pipeline.tooling.verify import _queue_message

    envelope = {
        "Type": "Notification",
        "Message": '{"trip_id": "trip-3"}',
        "MessageAttributes": {"reason": {"Type": "String", "Value": "wrong_type"}},
    }

    message = _queue_message({"Body": json.dumps(envelope)})

    assert message.reason == "wrong_type"
    assert message.trip_id == "trip-3"


# --- Queue depth ---------------------------------------------------------------------


class StubQueues:
    """A stand-in SQS client: fixed counts from GetQueueAttributes, no messages to receive."""

    def __init__(self, visible: int, in_flight: int = 0) -> None:
        self.counts = {
            "ApproximateNumberOfMessages": str(visible),
            "ApproximateNumberOfMessagesNotVisible": str(in_flight),
            "ApproximateNumberOfMessagesDelayed": "0",
        }

    def get_queue_attributes(self, QueueUrl, AttributeNames):  # noqa: N803 - boto3's parameter names
        return {"Attributes": dict(self.counts)}

    def receive_message(self, **request):
        return {"Messages": []}

    def change_message_visibility_batch(self, **request):
        return {"Successful": [], "Failed": []}


def test_empty_queue_passes():
    result = check_queue(StubQueues(0), "retry queue", "http://127.0.0.1/q")

    assert result.passed is True
    assert result.name == "retry queue is empty"


def test_messages_in_flight_count_as_left_over():
    result = check_queue(StubQueues(0, in_flight=2), "retry queue", "http://127.0.0.1/q")

    assert result.passed is False
    assert result.summary == "2 messages"


def test_expected_dead_letters_pass():
    result = check_queue(StubQueues(1), "dead-letter queue", "http://127.0.0.1/q", expected_messages=1)

    assert result.passed is True


def test_unknown_queue_is_skipped():
    result = check_queue(StubQueues(5), "dead-letter queue", None)

    assert result.passed is None
    assert result.status == "SKIP"


def test_report_needs_one_check_that_ran():
    skipped = CheckResult(name="x", passed=None, summary="skipped")
    passed = CheckResult(name="y", passed=True, summary="ok")
    failed = CheckResult(name="z", passed=False, summary="bad")

    assert VerificationReport([skipped]).passed is False
    assert VerificationReport([skipped, passed]).passed is True
    assert VerificationReport([passed, failed]).passed is False
