"""Trip writes against the local DynamoDB endpoint."""

from __future__ import annotations

from decimal import Decimal

import pytest
from boto3.dynamodb.types import TypeDeserializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxi_pipeline.errors import PermanentWriteError, RetryableWriteError
from taxi_pipeline.events import EventKind, parse_event
from taxi_pipeline.writes import TripWriter, WriteOutcome
from tests.trip_model import model_final, natural_order

pytestmark = pytest.mark.endpoint
_deserializer = TypeDeserializer()


def read_item(dynamodb, table: str, trip_id: str) -> dict | None:
    item = dynamodb.get_item(TableName=table, Key={"trip_id": {"S": trip_id}}, ConsistentRead=True).get(
        "Item"
    )
    return None if item is None else {name: _deserializer.deserialize(value) for name, value in item.items()}


def start(trip_id: str, version: int = 0, **fields):
    body = {
        "trip_id": trip_id,
        "start_time_local": "2023/01/23 06:37:21 AM",
        "event_version": version,
    }
    return parse_event({**body, **fields}, EventKind.START)


def end(trip_id: str, version: int = 0, **fields):
    body = {
        "trip_id": trip_id,
        "end_time_local": "2023/01/23 06:49:34 AM",
        "event_version": version,
    }
    return parse_event({**body, **fields}, EventKind.END)


@pytest.fixture
def writer(trip_table, aws_settings):
    return TripWriter(trip_table, settings=aws_settings)


def test_float_is_stored_as_exact_number(writer, dynamodb, trip_table):
    event = parse_event(b'{"trip_id":"f1","end_time_local":"2023/01/23 06:49:34 AM","tip":30.40}', "end")
    assert writer.apply(event).outcome is WriteOutcome.APPLIED

    raw = dynamodb.get_item(TableName=trip_table, Key={"trip_id": {"S": "f1"}})["Item"]
    assert raw["tip"] == {"N": "30.4"}


def test_repeat_is_duplicate_and_changes_nothing(writer, dynamodb, trip_table):
    event = end("d1", tip=3)
    assert writer.apply(event).outcome is WriteOutcome.APPLIED
    before = read_item(dynamodb, trip_table, "d1")

    assert writer.apply(event).outcome is WriteOutcome.DUPLICATE
    assert read_item(dynamodb, trip_table, "d1") == before


def test_stale_version_is_ignored(writer, dynamodb, trip_table):
    assert writer.apply(end("s1", version=5, tip=5)).outcome is WriteOutcome.APPLIED
    assert writer.apply(end("s1", version=4, tip=4)).outcome is WriteOutcome.STALE
    assert read_item(dynamodb, trip_table, "s1")["tip"] == Decimal(5)


def test_end_before_start_stays_ended(writer, dynamodb, trip_table):
    writer.apply(end("o1", tip=2))
    writer.apply(start("o1", hail_type="street"))

    item = read_item(dynamodb, trip_table, "o1")
    assert item["trip_status"] == "ended"
    assert item["hail_type"] == "street"
    assert item["tip"] == Decimal(2)


def test_newer_event_removes_fields_it_lacks(writer, dynamodb, trip_table):
    writer.apply(end("r1", version=1, tip=2, tolls=1))
    writer.apply(end("r1", version=2, tip=2))
    assert "tolls" not in read_item(dynamodb, trip_table, "r1")


def test_reserved_word_names_are_safe(writer, dynamodb, trip_table):
    # "timestamp", "status" and "name" are reserved words; unknown fields are not written.
    event = start("w1", hail_type="street", status="x", timestamp="y", name="z", **{"a.b-c": 1})
    assert writer.apply(event).outcome is WriteOutcome.APPLIED
    item = read_item(dynamodb, trip_table, "w1")
    assert set(item) == {
        "trip_id",
        "start_time_local",
        "hail_type",
        "start_revision",
        "trip_status",
    }


def test_missing_table_is_retryable(aws_settings):
    writer = TripWriter("no_such_table_here", settings=aws_settings)
    with pytest.raises(RetryableWriteError) as caught:
        writer.apply(start("m1"))
    assert caught.value.reason == "table_not_found"
    assert caught.value.trip_id == "m1"


def test_oversized_item_is_permanent(writer):
    # Each text field is capped at 256 characters, so only a huge trip id
    # list could exceed 400 KB; emulate the service's response instead.
    from botocore.stub import Stubber

    stubber = Stubber(writer.client)
    stubber.add_client_error(
        "update_item",
        service_error_code="ValidationException",
        service_message="Item size has exceeded the maximum allowed size",
        http_status_code=400,
    )
    with stubber, pytest.raises(PermanentWriteError) as caught:
        writer.apply(start("big1"))
    assert caught.value.reason == "item_too_large"


def test_throttling_is_retryable(writer):
    from botocore.stub import Stubber

    stubber = Stubber(writer.client)
    stubber.add_client_error(
        "update_item",
        service_error_code="ProvisionedThroughputExceededException",
        service_message="Rate exceeded",
        http_status_code=400,
    )
    with stubber, pytest.raises(RetryableWriteError) as caught:
        writer.apply(start("t1"))
    assert caught.value.reason == "throttled"


_case_counter = iter(range(1_000_000))

live_events = st.lists(
    st.one_of(
        st.builds(
            lambda v, h: ("start", v, h),
            st.integers(0, 2),
            st.sampled_from(["street", "dispatch", None]),
        ),
        st.builds(lambda v, t: ("end", v, t), st.integers(0, 2), st.sampled_from([0, 1.5, None])),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=live_events, data=st.data())
def test_live_writes_match_the_model(writer, dynamodb, trip_table, specs, data):
    # GIVEN distinct events of a fresh trip, delivered shuffled and repeated
    trip_id = f"live-{next(_case_counter)}"
    events = [
        start(trip_id, version, hail_type=value) if kind == "start" else end(trip_id, version, tip=value)
        for kind, version, value in specs
    ]
    deliveries = data.draw(st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=4))))

    # WHEN they are written
    for event in deliveries:
        writer.apply(event)

    # THEN the table contains the model's item for the natural order
    assert read_item(dynamodb, trip_table, trip_id) == model_final(natural_order(events))
