"""Unit tests of the trip-write request and of the write rules' model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from taxi_pipeline.events import EventKind, parse_event
from taxi_pipeline.writes import build_update
from tests.trip_model import model_final, natural_order

TRIP_ID = "trip-7"


def start_event(version: int = 0, **fields):
    return parse_event(
        {
            "trip_id": TRIP_ID,
            "start_time_local": "2023/01/23 06:37:21 AM",
            "event_version": version,
            **fields,
        },
        EventKind.START,
    )


def end_event(version: int = 0, **fields):
    return parse_event(
        {
            "trip_id": TRIP_ID,
            "end_time_local": "2023/01/23 06:49:34 AM",
            "event_version": version,
            **fields,
        },
        EventKind.END,
    )


def test_update_aliases_every_attribute_name():
    request = build_update(end_event(tip=1), "taxi_trip_details")
    names = request["ExpressionAttributeNames"]
    assert set(names.values()) >= {"tip", "end_revision", "trip_status", "end_time_local"}
    for name in names.values():
        assert f" {name} " not in f" {request['UpdateExpression']} "


def test_update_removes_fields_without_value():
    request = build_update(end_event(tip=1), "taxi_trip_details")
    expression = request["UpdateExpression"]
    removed = expression.split(" REMOVE ")[1].split(", ")
    removed_names = {request["ExpressionAttributeNames"][alias] for alias in removed}
    assert "tolls" in removed_names
    assert "tip" not in removed_names


def test_update_is_conditional_on_revision():
    request = build_update(start_event(), "taxi_trip_details")
    assert request["ConditionExpression"] == "attribute_not_exists(#rev) OR #rev < :rev"
    assert request["ExpressionAttributeNames"]["#rev"] == "start_revision"
    assert request["ReturnValuesOnConditionCheckFailure"] == "ALL_OLD"


def test_start_never_overwrites_status():
    request = build_update(start_event(), "taxi_trip_details")
    assert "#status = if_not_exists(#status, :status)" in request["UpdateExpression"]
    assert request["ExpressionAttributeValues"][":status"] == {"S": "started"}


def test_end_before_start_keeps_end():
    final = model_final([end_event(), start_event()])
    assert final["trip_status"] == "ended"
    assert "end_time_local" in final
    assert "start_time_local" in final


def test_older_version_never_replaces_newer():
    newer, older = end_event(version=2, tip=5), end_event(version=1, tip=9)
    final = model_final([newer, older])
    assert final["tip"] == 5
    assert final["end_revision"] == newer.revision


# Distinct events of one trip: a few versions and contents of each kind.
trip_events = st.lists(
    st.one_of(
        st.builds(
            start_event,
            version=st.integers(0, 3),
            hail_type=st.sampled_from(["street", "dispatch", None]),
        ),
        st.builds(end_event, version=st.integers(0, 3), tip=st.sampled_from([0, 1.5, "2,000.10", None])),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(events=trip_events, data=st.data())
def test_any_order_and_repetition_gives_same_item(events, data):
    # GIVEN a delivery of the events in any order, each any number of times
    deliveries = data.draw(st.lists(st.sampled_from(events), min_size=len(events), max_size=3 * len(events)))
    deliveries += events
    shuffled = data.draw(st.permutations(deliveries))

    # THEN the item equals applying each distinct event once in natural order
    assert model_final(list(shuffled)) == model_final(natural_order(events))
