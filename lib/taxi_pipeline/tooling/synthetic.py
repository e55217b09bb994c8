"""Generate synthetic taxi trips shaped like the DataSF export, for runs without real data.

The rows have the real files' columns and quirks. Timestamps are in the
portal's form (``2023/01/23 06:37:21 AM``, San Francisco local time). Counts
and distances are text with thousands separators (``"2,081,284"``), and
money and ``paratransit`` are floats. The fee and coordinate columns have
nulls, and ``driver_id`` has the placeholder ``-``. ``total_fare_amount``
equals the base fare (meter or upfront) plus tolls, exit fee, other fees,
tip and extras. A few trips are recorded twice under two trip ids, the
second copy flagged ``DR-`` in ``qa_flags``, as in the real export.

The same seed always gives the same trips. Nothing here is real data.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from taxi_pipeline.tooling.sample import TripSample

DEFAULT_TRIP_COUNT = 200
DEFAULT_SEED = 7
PORTAL_TIMESTAMP = "%Y/%m/%d %I:%M:%S %p"

START_COLUMNS = (
    "trip_id",
    "start_time_local",
    "vehicle_placard_number",
    "driver_id",
    "pickup_location_latitude",
    "pickup_location_longitude",
    "dropoff_location_latitude",
    "dropoff_location_longitude",
    "hail_type",
    "upfront_pricing",
)
END_COLUMNS = (
    "trip_id",
    "end_time_local",
    "fare_type",
    "meter_fare_amount",
    "promo_rate",
    "tolls",
    "sf_exit_fee",
    "other_fees",
    "tip",
    "extra_amount",
    "total_fare_amount",
    "fare_time_milliseconds",
    "trip_distance_meters",
    "qa_flags",
    "paratransit",
)

# Shares below are rounded from the real 200-trip sample.
_HAIL_TYPES = (
    ("street", 60),
    ("dispatch", 28),
    ("flywheel_uber", 5),
    ("yo_taxi_app", 4),
    ("flywheel_app", 3),
)
_QA_CODES = ("IT-", "LP-", "OI-", "VI-", "TI-", "FD-", "WTM-")
_FIRST_DAY = datetime(2022, 12, 1)
_DAYS = 395
# Airport pickups (37.615, -122.385) are frequent in the real sample.
_AIRPORT = (37.615, -122.385)
_CITY_LATITUDES = (37.70, 37.81)
_CITY_LONGITUDES = (-122.51, -122.38)
_METER_FLAG_DROP = Decimal("4.15")
_METER_STEP = Decimal("0.65")
_METERS_PER_STEP = 322  # one fifth of a mile
_DUPLICATE_SHARE = 0.05


def generate_trips(count: int = DEFAULT_TRIP_COUNT, seed: int = DEFAULT_SEED) -> TripSample:
    """Generate ``count`` synthetic trips, each with one start row and one end row."""
    if count < 1:
        raise ValueError(f"trip count {count} is invalid: generate at least 1 trip")
    rng = random.Random(seed)

    start_rows: list[dict[str, Any]] = []
    end_rows: list[dict[str, Any]] = []
    while len(start_rows) < count:
        start, end = _generate_trip(rng)
        start_rows.append(start)
        end_rows.append(end)
        if len(start_rows) < count and rng.random() < _DUPLICATE_SHARE:
            copy_start, copy_end = _recorded_twice(rng, start, end)
            start_rows.append(copy_start)
            end_rows.append(copy_end)

    return TripSample(
        start_rows=tuple(start_rows),
        end_rows=tuple(end_rows),
        source=f"{count} generated trips (seed {seed}), not real data",
        synthetic=True,
        seed=seed,
    )


def _generate_trip(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    trip_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    started = _FIRST_DAY + timedelta(days=rng.randrange(_DAYS), seconds=rng.randrange(86_400))

    # A few real trips have zero fare time or zero distance.
    duration_ms = 0 if rng.random() < 0.02 else rng.randrange(60_000, 3_600_000)
    distance = Decimal(0) if rng.random() < 0.03 else Decimal(rng.randrange(300_000, 45_000_000)) / 1000
    ended = started + timedelta(milliseconds=duration_ms or rng.randrange(30_000, 600_000))

    meter_fare = _METER_FLAG_DROP + _METER_STEP * int(distance // _METERS_PER_STEP)
    upfront = rng.random() < 0.06
    upfront_price = (meter_fare * Decimal("0.9")).quantize(Decimal("0.01")) if upfront else None
    charges = {
        "tolls": _pick(rng, ((None, 83), (0.0, 15), (1.0, 1), (1.5, 1))),
        "sf_exit_fee": _pick(rng, ((None, 90), (5.5, 10))),
        "other_fees": _pick(rng, ((None, 53), (0.0, 37), (5.5, 7), (1.25, 3))),
        "tip": _pick(rng, ((0.0, 90), (1.0, 2), (2.0, 3), (3.0, 2), (5.0, 2), (1.9, 1))),
        "extra_amount": _pick(rng, ((None, 62), (0.0, 21), (5.5, 16), (9.0, 1))),
    }
    base = upfront_price if upfront else meter_fare
    total = base + sum((Decimal(repr(value)) for value in charges.values() if value), Decimal(0))

    pickup = _coordinates(rng, airport_share=0.28, null_share=0.01)
    dropoff = _coordinates(rng, airport_share=0.05, null_share=0.005)
    start = {
        "trip_id": trip_id,
        "start_time_local": started.strftime(PORTAL_TIMESTAMP),
        "vehicle_placard_number": rng.randrange(1, 1600),
        "driver_id": "-" if rng.random() < 0.19 else f"{rng.choice('ABCDEF')}-{rng.randrange(10_000):04d}",
        "pickup_location_latitude": pickup[0],
        "pickup_location_longitude": pickup[1],
        "dropoff_location_latitude": dropoff[0],
        "dropoff_location_longitude": dropoff[1],
        "hail_type": _pick(rng, _HAIL_TYPES),
        "upfront_pricing": _money(upfront_price),
    }
    end = {
        "trip_id": trip_id,
        "end_time_local": ended.strftime(PORTAL_TIMESTAMP),
        "fare_type": "upfront_pricing" if upfront else "meter_fare",
        "meter_fare_amount": _money(meter_fare),
        "promo_rate": None,
        **charges,
        "total_fare_amount": _money(total),
        "fare_time_milliseconds": f"{duration_ms:,}",
        "trip_distance_meters": _separated(distance),
        "qa_flags": None if rng.random() < 0.16 else "".join(sorted(set(rng.choices(_QA_CODES, k=2)))),
        "paratransit": 1.0 if rng.random() < 0.03 else 0.0,
    }
    return start, end


def _recorded_twice(
    rng: random.Random, start: dict[str, Any], end: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copy a trip under a new trip id and add ``DR-`` to the copy's ``qa_flags``."""
    trip_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    flags = (end["qa_flags"] or "") + "DR-"
    return {**start, "trip_id": trip_id}, {**end, "trip_id": trip_id, "qa_flags": flags}


def _pick(rng: random.Random, weighted: tuple[tuple[Any, int], ...]) -> Any:
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights=weights)[0]


def _coordinates(
    rng: random.Random, airport_share: float, null_share: float
) -> tuple[float | None, float | None]:
    if rng.random() < null_share:
        return None, None
    if rng.random() < airport_share:
        latitude = _AIRPORT[0] + rng.choice((0.0, 0.002))
        longitude = _AIRPORT[1] + rng.choice((0.0, 0.001))
        return round(latitude, 3), round(longitude, 3)
    return round(rng.uniform(*_CITY_LATITUDES), 3), round(rng.uniform(*_CITY_LONGITUDES), 3)


def _money(value: Decimal | None) -> float | None:
    """Return an amount as the float the export has, whose repr is the amount's digits."""
    return None if value is None else float(value)


def _separated(value: Decimal) -> str:
    """Format a number with thousands separators and no trailing zeros, like ``"2,735.8848"``."""
    if not value:
        return "0"
    whole, _, fraction = f"{value:,.4f}".partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole
