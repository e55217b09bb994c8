"""Run one replay or backfill on a fresh local Spark session, in a process of its own.

``bench.run`` starts ``python -m bench.job_process`` once per queue depth,
so the peak memory of the driver's Python process belongs to that depth
alone. It is reported here as ``VmHWM`` and as ``ru_maxrss``; the latter
carries over the high-water mark of the process that started this one.
The parent samples the peaks of the Spark driver's JVM and its Python
workers. The result is written as JSON.

Spark runs with its event log on and with ``bench.timed_daemon`` as the
Python daemon, so the run can be broken into steps afterwards
(``bench.spark_events``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.processes import MIB, ProcessSampler, cpu_seconds, load_average, peak_rss_bytes
from bench.spark_events import profile_run
from bench.timed_daemon import CALL_LOG_VARIABLE
from taxi_pipeline.aws import AwsSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
REPLAY = "replay"
BACKFILL = "backfill"


class WaveLog(logging.Handler):
    """Keep the replay job's per-wave log records (messages, seconds, receive seconds).

    NOTE: this reads the arguments of the job's "wave %d: %d messages in ..."
    log line; if that line changes, ``waves_logged`` stays empty and the
    wave tables show no message counts.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.waves: list[dict[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("wave ") or not isinstance(record.args, tuple):
            return
        if len(record.args) < 4:
            return
        number, received, seconds, receive_seconds = record.args[:4]
        self.waves.append(
            {
                "wave": number,
                "messages": received,
                "seconds": round(seconds, 3),
                "receive_seconds": round(receive_seconds, 3),
            }
        )


def start_spark(
    app_name: str,
    cores: str,
    event_log_dir: Path | None,
    timed_daemon: bool,
    extra_conf: dict[str, str] | None = None,
):
    """Start a local SparkSession bound to 127.0.0.1, with this interpreter for Python workers.

    Python workers are reused between tasks, as on Glue. With
    ``timed_daemon`` the workers time their AWS calls (``bench.timed_daemon``).
    ``extra_conf`` is applied last, for experiments such as turning off
    adaptive query execution.
    """
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    # The Python workers import bench.timed_daemon, so the repository root
    # goes on their path; the JVM passes PYTHONPATH on to them.
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(python_path)

    builder = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.python.worker.reuse", "true")
    )
    if event_log_dir is not None:
        builder = (
            builder.config("spark.eventLog.enabled", "true")
            .config("spark.eventLog.dir", event_log_dir.as_uri())
            .config("spark.eventLog.compress", "false")
        )
    if timed_daemon:
        builder = builder.config("spark.python.daemon.module", "bench.timed_daemon")
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run_measured(
    mode: str,
    settings: AwsSettings,
    options: Any,
    *,
    cores: str = "*",
    ministack_pid: int | None = None,
    work_dir: Path | None = None,
    extra_conf: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start Spark, run the replay or backfill, and stop Spark. Return timings, memory and the profile."""
    from taxi_pipeline.replay import run_backfill, run_replay

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="bench-job-"))
    event_log_dir = work_dir / "events"
    call_log_dir = work_dir / "calls"
    event_log_dir.mkdir(parents=True, exist_ok=True)
    call_log_dir.mkdir(parents=True, exist_ok=True)
    os.environ[CALL_LOG_VARIABLE] = str(call_log_dir)

    wave_log = WaveLog()
    logging.getLogger("taxi_pipeline.replay.job").addHandler(wave_log)
    logging.getLogger("taxi_pipeline.replay.job").setLevel(logging.INFO)

    load_before = load_average()
    # Two one-off readings only: the peaks are sampled by the parent process.
    snapshot = ProcessSampler()
    started = time.perf_counter()
    spark = start_spark(f"bench-{mode}", cores, event_log_dir, timed_daemon=True, extra_conf=extra_conf)
    spark_ready = time.perf_counter()

    jvm_cpu_before, workers_cpu_before = snapshot.cpu_snapshot()
    ministack_cpu_before = cpu_seconds(ministack_pid) if ministack_pid else None
    driver_before = resource.getrusage(resource.RUSAGE_SELF)
    run_started = time.perf_counter()
    if mode == REPLAY:
        report = run_replay(spark, options, settings)
    else:
        report = run_backfill(spark, options, settings)
    finished = time.perf_counter()
    driver_after = resource.getrusage(resource.RUSAGE_SELF)
    ministack_cpu_after = cpu_seconds(ministack_pid) if ministack_pid else None
    jvm_cpu_after, workers_cpu_after = snapshot.cpu_snapshot()

    spark.stop()
    run_seconds = finished - run_started
    result: dict[str, Any] = {
        "mode": mode,
        "spark_conf": dict(extra_conf or {}),
        "report": report.to_dict(),
        "spark_start_seconds": round(spark_ready - started, 3),
        "run_seconds": round(run_seconds, 3),
        "total_seconds": round(finished - started, 3),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "driver_peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
        "driver_ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_seconds_during_run": {
            "driver_python": round(
                (driver_after.ru_utime + driver_after.ru_stime)
                - (driver_before.ru_utime + driver_before.ru_stime),
                2,
            ),
            "jvm": round(jvm_cpu_after - jvm_cpu_before, 2),
            "python_workers": round(workers_cpu_after - workers_cpu_before, 2),
            "ministack": None
            if ministack_cpu_before is None
            else round(ministack_cpu_after - ministack_cpu_before, 2),
        },
        "waves_logged": wave_log.waves,
    }
    try:
        result["profile"] = profile_run(event_log_dir, call_log_dir, backfill=mode == BACKFILL)
    except (OSError, ValueError, KeyError) as exc:
        result["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def _replay_options(args: argparse.Namespace):
    from taxi_pipeline.replay import ReplayOptions

    overrides = {}
    if args.wait_time_seconds is not None:
        overrides["wait_time_seconds"] = args.wait_time_seconds
    if args.wave_size is not None:
        overrides["wave_size"] = args.wave_size
    return ReplayOptions(
        queue_url=args.queue_url,
        table_name=args.table,
        dead_letter_queue_url=args.dead_letter_url,
        max_runtime_seconds=args.max_runtime_seconds,
        **overrides,
    )


def _backfill_options(args: argparse.Namespace):
    from taxi_pipeline.replay import BackfillOptions

    return BackfillOptions(source=args.source, table_name=args.table, source_format="parquet")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """Turn ``KEY=VALUE`` strings into a dict, or raise ``SystemExit`` naming one without ``=``."""
    settings = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise SystemExit(f"--spark-conf {pair!r} is invalid: use KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.job_process",
        description="Run one measured replay or backfill on a fresh local Spark session.",
    )
    parser.add_argument("mode", choices=(REPLAY, BACKFILL))
    parser.add_argument("--endpoint-url", required=True, help="URL of the local AWS endpoint")
    parser.add_argument("--region", default="us-east-1", help="AWS region of the endpoint's resources")
    parser.add_argument("--table", required=True, help="trip table name")
    parser.add_argument("--queue-url", help="retry queue URL (replay)")
    parser.add_argument("--dead-letter-url", help="dead-letter queue URL (replay)")
    parser.add_argument("--source", help="folder of Parquet files (backfill)")
    parser.add_argument("--result", required=True, type=Path, help="file to write the JSON result to")
    parser.add_argument("--work-dir", type=Path, help="folder for the event log and call log")
    parser.add_argument("--ministack-pid", type=int, help="MiniStack's process id, for its CPU time")
    parser.add_argument("--cores", default="*", help="local Spark cores, a number or * (default: *)")
    parser.add_argument(
        "--wait-time-seconds",
        type=int,
        help="long-poll wait of each receive, 0 to 20 (default: the job's own default)",
    )
    parser.add_argument(
        "--wave-size", type=int, help="messages received per wave (default: the job's own default)"
    )
    parser.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Spark setting, applied last; repeat for more",
    )
    parser.add_argument(
        "--max-runtime-seconds", type=float, default=900.0, help="the replay's time limit (default: 900)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = AwsSettings(region=args.region, endpoint_url=args.endpoint_url)
    if args.mode == REPLAY:
        if not (args.queue_url and args.dead_letter_url):
            raise SystemExit("--queue-url and --dead-letter-url are missing: a replay needs both")
        options = _replay_options(args)
    else:
        if not args.source:
            raise SystemExit("--source is missing: a backfill needs a folder of Parquet files")
        options = _backfill_options(args)

    result = run_measured(
        args.mode,
        settings,
        options,
        cores=args.cores,
        ministack_pid=args.ministack_pid,
        work_dir=args.work_dir,
        extra_conf=parse_settings(args.spark_conf),
    )
    args.result.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
