"""The replay job: drain the retry queue into the trip table, or backfill from files.

This subpackage needs PySpark; the rest of ``taxi_pipeline`` does not.
"""

from __future__ import annotations

from taxi_pipeline.replay.backfill import run_backfill
from taxi_pipeline.replay.job import run_replay
from taxi_pipeline.replay.options import BackfillOptions, ReplayOptions
from taxi_pipeline.replay.report import RunReport

__all__ = ["BackfillOptions", "ReplayOptions", "RunReport", "run_backfill", "run_replay"]
