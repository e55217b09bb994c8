"""Parquet backfill sources made from the trip sample under new trip ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.workload import renamed_pairs
from taxi_pipeline.tooling.sample import TripSample

# The column types of the DataSF export's Parquet files.
START_SCHEMA = pa.schema(
    [
        ("trip_id", pa.string()),
        ("start_time_local", pa.string()),
        ("vehicle_placard_number", pa.int64()),
        ("driver_id", pa.string()),
        ("pickup_location_latitude", pa.float64()),
        ("pickup_location_longitude", pa.float64()),
        ("dropoff_location_latitude", pa.float64()),
        ("dropoff_location_longitude", pa.float64()),
        ("hail_type", pa.string()),
        ("upfront_pricing", pa.float64()),
    ]
)
END_SCHEMA = pa.schema(
    [
        ("trip_id", pa.string()),
        ("end_time_local", pa.string()),
        ("fare_type", pa.string()),
        ("meter_fare_amount", pa.float64()),
        ("promo_rate", pa.float64()),
        ("tolls", pa.float64()),
        ("sf_exit_fee", pa.float64()),
        ("other_fees", pa.float64()),
        ("tip", pa.float64()),
        ("extra_amount", pa.float64()),
        ("total_fare_amount", pa.float64()),
        ("fare_time_milliseconds", pa.string()),
        ("trip_distance_meters", pa.string()),
        ("qa_flags", pa.string()),
        ("paratransit", pa.float64()),
    ]
)


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_backfill_source(sample: TripSample, rows: int, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Write ``rows`` events (half start, half end) of new trips as two Parquet files in ``folder``.

    Returns the number of rows and trips written and the folder.
    """
    if rows < 2:
        raise ValueError(f"backfill rows {rows} is invalid: use at least 2")
    folder.mkdir(parents=True, exist_ok=True)
    pairs = renamed_pairs(sample, rows // 2, random.Random(seed))

    pq.write_table(_table([start for start, _ in pairs], START_SCHEMA), folder / "start_taxi_trips.parquet")
    pq.write_table(_table([end for _, end in pairs], END_SCHEMA), folder / "end_taxi_trips.parquet")
    return {"rows": 2 * len(pairs), "trips": len(pairs), "folder": str(folder)}
