"""A pure model of the trip-write rules, used to check the real writes against it."""

from __future__ import annotations

from typing import Any

from taxi_pipeline.events import REVISION_ATTRIBUTE, EventKind, TripEvent


def model_apply(item: dict[str, Any], event: TripEvent) -> dict[str, Any]:
    """Return the item after one event, following the documented write rules."""
    revision_attribute = REVISION_ATTRIBUTE[event.kind]
    stored = item.get(revision_attribute)
    if stored is not None and stored >= event.revision:
        return item

    updated = dict(item)
    updated["trip_id"] = event.trip_id
    for name, value in event.attributes.items():
        if value is None:
            updated.pop(name, None)
        else:
            updated[name] = value
    updated[revision_attribute] = event.revision
    if event.kind is EventKind.END:
        updated["trip_status"] = "ended"
    else:
        updated.setdefault("trip_status", "started")
    return updated


def model_final(events: list[TripEvent]) -> dict[str, Any]:
    """Apply the events in the given order and return the final item."""
    item: dict[str, Any] = {}
    for event in events:
        item = model_apply(item, event)
    return item


def natural_order(events: list[TripEvent]) -> list[TripEvent]:
    """Return each distinct event once: starts, then ends, each kind by revision."""
    distinct = {(event.kind, event.revision): event for event in events}
    return sorted(distinct.values(), key=lambda event: (event.kind is EventKind.END, event.sort_key()))
