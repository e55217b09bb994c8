"""The benchmark's pieces at tiny sizes, so ``python -m bench.run`` keeps working.

Each piece runs against the session's local endpoint as the full benchmark
runs it: the naive drain, one ceiling level, a replay in a fresh Spark
process, the backfill source, the stream functions, and the report built
from their results. The figures themselves are not checked, only that every
message was applied and deleted and that the report contains every section.
The backfill's Spark run goes through the same ``bench.job_process`` as the
replay and is left out to keep the test short.
"""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from bench import ceiling, report, run, workload
from bench.backfill import write_backfill_source
from bench.estimate import estimate_glue_throughput
from bench.machine import describe_machine
from taxi_pipeline.events import EventKind

pytestmark = [pytest.mark.endpoint, pytest.mark.spark]

SEED = 3


@pytest.fixture(scope="module")
def trips():
    """The real sample, or generated trips where it is missing."""
    return workload.load_trips(None, SEED)


def test_bench_pieces_at_tiny_sizes(aws_settings, trips, tmp_path):
    progress = run.Progress()

    # GIVEN a queue of 100 messages per piece: the baseline drains one queue
    baseline = run.run_baseline(aws_settings, trips, [100], SEED, 60.0, progress)
    assert [piece["complete"] for piece in baseline] == [True]
    assert baseline[0]["messages"] == 100

    # WHEN one ceiling level runs for a second
    rng = random.Random(SEED)
    bodies = [(EventKind.END, body) for body in workload.event_bodies(trips, EventKind.END, 10, rng)]
    dynamodb = aws_settings.client("dynamodb")
    table = workload.create_trip_table(dynamodb, "bench-smoke")
    try:
        level = ceiling.measure_level(aws_settings, ceiling.base_requests(bodies, table), 1, 2, 1.0)
    finally:
        workload.delete_trip_table(dynamodb, table)
    assert level.calls > 0
    assert level.errors == 0

    # AND the replay job drains another queue in a Spark process of its own
    replay = run.run_replay_depth(aws_settings, trips, 100, SEED, tmp_path, None, 0, progress)
    assert replay["complete"], replay
    assert replay["job"]["report"]["counts"]["messages_deleted"] == 100
    steps = {step["step"] for step in replay["job"]["profile"]["steps"]}
    assert {"receive", "parse", "write + delete"} <= steps
    assert replay["job"]["driver_peak_rss_mib"] > 0
    assert replay["job"]["memory"]["jvm_peak_rss_mib"] > 0

    # AND a backfill source contains new trips of both kinds
    source = write_backfill_source(trips, 200, tmp_path / "backfill", SEED)
    starts = pq.read_table(tmp_path / "backfill" / "start_taxi_trips.parquet")
    ends = pq.read_table(tmp_path / "backfill" / "end_taxi_trips.parquet")
    assert (source["rows"], starts.num_rows, ends.num_rows) == (200, 100, 100)
    assert starts.column("trip_id").to_pylist() == ends.column("trip_id").to_pylist()

    # THEN the report contains every section and the targets it can check
    results = {
        "started_at": "2026-01-01T00:00:00+00:00",
        "command": "pytest",
        "machine": describe_machine(),
        "sample": {"source": trips.source, "synthetic": trips.synthetic, "trips": 200},
        "ceiling": {"levels": [level.to_dict()], "best": level.to_dict(), "seconds_per_level": 1.0},
        "baseline": baseline,
        "replay": [replay],
        "load_average_at_end": (0.0, 0.0, 0.0),
        "total_seconds": 1.0,
    }
    results["targets"] = report.evaluate_targets(results)
    results["estimate"] = estimate_glue_throughput(results)
    assert [report.verdict(target) for target in results["targets"]][2:] == ["n/a", "n/a"]
    assert results["estimate"]["available"]

    document = tmp_path / "benchmarks.md"
    report.update_document(document, report.render_markdown(results, None, document))
    text = document.read_text()
    assert text.count(report.BEGIN_MARKER) == 1
    assert "### Targets" in text
    assert "### Estimate on AWS Glue" in text
    assert "Replay steps at 100 messages" in report.render_console(results)


def test_bench_functions_at_tiny_sizes(aws_settings, tmp_path):
    functions = run.run_functions(aws_settings, None, SEED, [5], 1, 1, tmp_path, run.Progress())

    for kind in ("start", "end"):
        assert functions["handlers"][kind]["5"]["failed_records"] == 0
        assert functions["handlers"][kind]["5"]["median_records_per_second"] > 0
        assert functions["imports"][kind]["median_ms"] > 0
