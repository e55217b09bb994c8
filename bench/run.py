"""Run the pipeline's benchmarks against a local MiniStack and write ``docs/benchmarks.md``.

``python -m bench.run`` (or ``make bench``) starts MiniStack on 127.0.0.1
and measures, in one run:

1. the baseline: a naive one-thread drain of the retry queue (``bench.naive``);
2. the ceiling: MiniStack's highest rate of trip ``UpdateItem`` calls (``bench.ceiling``);
3. the replay job at each queue depth, each in a fresh process (``bench.job_process``);
4. the stream functions' records per second and cold import time (``bench.functions``);
5. a backfill from Parquet (``bench.backfill``).

It prints a table, checks the targets, and rewrites the generated section
of the benchmark document and its plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ceiling, naive, report, workload
from bench.backfill import write_backfill_source
from bench.estimate import estimate_glue_throughput
from bench.functions import measure_import_times
from bench.machine import describe_machine
from bench.processes import ProcessSampler, load_average
from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.events import EventKind
from taxi_pipeline.tooling.local_endpoint import (
    LocalEndpoint,
    LocalEndpointError,
    dummy_aws_environment,
    is_scrubbed_aws_variable,
    no_proxy_with_loopback,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
DEFAULT_DEPTHS = (1_000, 10_000, 50_000)
QUICK_DEPTHS = (200, 1_000)
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
PLOT_NAME = "benchmarks-throughput.png"
BASELINE_DEPTHS = (1_000, 10_000)
QUICK_CEILING_LEVELS = ((1, 1), (1, 8), (2, 8))
FUNCTION_BATCH_SIZES = (100, 500)
JOB_TIME_LIMIT_SECONDS = 900.0
SUBPROCESS_GRACE_SECONDS = 300.0

logger = logging.getLogger(__name__)


def use_local_credentials(endpoint_url: str | None = None) -> None:
    """Point every AWS client of this process and its children at dummy credentials and loopback."""
    for name in list(os.environ):
        if is_scrubbed_aws_variable(name):
            del os.environ[name]
    os.environ.update(dummy_aws_environment(REGION))
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = no_proxy_with_loopback(os.environ.get(name))
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


def _depths(text: str) -> list[int]:
    try:
        depths = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--depths {text!r} is invalid: use whole numbers such as 1000,10000"
        ) from exc
    if not depths or any(depth < 10 for depth in depths):
        raise argparse.ArgumentTypeError(f"--depths {text!r} is invalid: use depths of at least 10 messages")
    return sorted(set(depths))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the replay job, the stream functions and the backfill "
        "against a local MiniStack that the run starts itself.",
    )
    parser.add_argument(
        "--depths",
        type=_depths,
        help="queue depths of the replay runs, comma-separated (default: 1000,10000,50000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: depths 200,1000, 2-second ceiling levels, one invocation per batch size, "
        "4,000 backfill rows",
    )

    parser.add_argument("--skip-functions", action="store_true", help="do not measure the stream functions")
    parser.add_argument("--skip-backfill", action="store_true", help="do not measure the backfill")

    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="benchmark document whose generated section is rewritten (default: docs/benchmarks.md)",
    )
    parser.add_argument(
        "--no-document", action="store_true", help="print the figures only, write no document"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    parser.add_argument("--json", type=Path, help="also write every figure of the run to this JSON file")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: print and write the document and plot from the figures that an "
        "earlier run saved with --json",
    )

    parser.add_argument(
        "--data",
        help="folder of the trip sample (default: $TAXI_SAMPLE_DIR, else ../shared/data/sf_taxi_trips); "
        "generated trips are used when it is missing",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of trip ids and message order (default: 1)")

    parser.add_argument(
        "--wait-time-seconds",
        type=int,
        help="long-poll wait of the replay job's receives, 0 to 20 (default: the job's default)",
    )
    parser.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Spark setting for the replay and backfill runs, for experiments; repeat for more",
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, help="length of each ceiling level's window in seconds (default: 5)"
    )
    parser.add_argument(
        "--baseline-budget-seconds",
        type=float,
        default=150.0,
        help="the naive drain also runs at 10,000 messages when its rate at 1,000 "
        "predicts at most this many seconds (default: 150)",
    )
    parser.add_argument(
        "--backfill-rows", type=int, help="rows of the Parquet backfill source (default: 100000)"
    )
    return parser


class Progress:
    """Print one line per step with the time since the run started and the 1-minute load."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f} s, load {os.getloadavg()[0]:4.1f}] {text}", flush=True)


# --- The measurements ---------------------------------------------------------------


def run_ceiling(
    settings: AwsSettings,
    sample: Any,
    seed: int,
    levels: Sequence[tuple[int, int]],
    seconds: float,
    ministack_pid: int | None,
    progress: Progress,
) -> dict[str, Any]:
    """Measure MiniStack's ``UpdateItem`` rate at each concurrency level."""
    dynamodb = settings.client("dynamodb")
    table = workload.create_trip_table(dynamodb, "bench-ceiling")
    try:
        rng = random.Random(seed)
        bodies = [
            (EventKind.START, body) for body in workload.event_bodies(sample, EventKind.START, 200, rng)
        ]
        bodies += [(EventKind.END, body) for body in workload.event_bodies(sample, EventKind.END, 200, rng)]
        requests = ceiling.base_requests(bodies, table)
        levels_measured = []
        for processes, threads in levels:
            level = ceiling.measure_level(settings, requests, processes, threads, seconds, ministack_pid)
            progress.say(
                f"ceiling {processes} process(es) x {threads} thread(s): "
                f"{level.calls_per_second:,.0f} UpdateItem/s"
            )
            levels_measured.append(level)
    finally:
        workload.delete_trip_table(dynamodb, table)
    best = ceiling.best_level(levels_measured)
    return {
        "levels": [level.to_dict() for level in levels_measured],
        "best": best.to_dict(),
        "seconds_per_level": seconds,
    }


def run_baseline_depth(
    settings: AwsSettings, sample: Any, depth: int, seed: int, time_limit: float
) -> dict[str, Any]:
    """Fill a fresh queue and table with ``depth`` messages and drain them naively."""
    sqs = settings.client("sqs")
    dynamodb = settings.client("dynamodb")
    built = workload.build_retry_workload(sample, depth, seed)
    table = workload.create_trip_table(dynamodb, "bench-baseline")
    queue = workload.create_retry_queue(sqs, "bench-baseline")
    try:
        fill_seconds = workload.fill_queue(settings, queue.url, built.bodies)
        result = naive.drain_naively(settings, queue.url, table, depth, time_limit)
        items = workload.count_items(dynamodb, table)
        left = workload.queue_depths(sqs, queue.url)
    finally:
        workload.delete_retry_queue(sqs, queue)
        workload.delete_trip_table(dynamodb, table)
    return {
        "depth": depth,
        "fill_seconds": round(fill_seconds, 2),
        **result.to_dict(),
        "complete": result.messages == depth and items == built.trips and not any(left.values()),
        "items": items,
        "expected_items": built.trips,
    }


def run_baseline(
    settings: AwsSettings,
    sample: Any,
    depths: list[int],
    seed: int,
    budget_seconds: float,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Run the naive drain at the first baseline depth, and at the next ones while they fit the budget."""
    results: list[dict[str, Any]] = []
    for depth in depths:
        if results:
            predicted = depth / max(results[-1]["messages_per_second"], 1e-9)
            if predicted > budget_seconds:
                progress.say(
                    f"baseline at {depth:,} skipped: {predicted:,.0f} s predicted, "
                    f"budget {budget_seconds:,.0f} s"
                )
                break
        result = run_baseline_depth(
            settings, sample, depth, seed + depth, time_limit=max(budget_seconds, 60.0) * 2
        )
        progress.say(f"baseline at {depth:,} messages: {result['messages_per_second']:,.1f} messages/s")
        results.append(result)
    return results


def _python_environment() -> dict[str, str]:
    environment = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def _run_job_process(
    arguments: list[str], result_path: Path, log_path: Path, time_limit: float
) -> dict[str, Any]:
    """Run ``python -m bench.job_process`` while sampling its processes, and return its JSON result.

    The result's ``memory`` contains the sampled peaks of the driver, its
    JVM and the Python workers.
    """
    command = [sys.executable, "-m", "bench.job_process", *arguments, "--result", str(result_path)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=_python_environment(), cwd=REPO_ROOT
        )
        with ProcessSampler(root=process.pid) as sampler:
            try:
                returncode = process.wait(timeout=time_limit)
            except subprocess.TimeoutExpired as exc:
                process.kill()
                process.wait()
                raise RuntimeError(
                    f"the measured job timed out after {time_limit:.0f} s; its log is {log_path}"
                ) from exc
    if returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(
            f"the measured job failed with exit code {returncode}; last lines of {log_path}:\n"
            + "\n".join(tail)
        )
    result = json.loads(result_path.read_text())
    result["memory"] = sampler.peaks.to_dict()
    return result


def run_replay_depth(
    settings: AwsSettings,
    sample: Any,
    depth: int,
    seed: int,
    work_dir: Path,
    ministack_pid: int | None,
    wait_time_seconds: int | None,
    progress: Progress,
    spark_conf: Sequence[str] = (),
) -> dict[str, Any]:
    """Fill a fresh queue and table with ``depth`` messages, then drain them with the replay job."""
    sqs = settings.client("sqs")
    dynamodb = settings.client("dynamodb")
    built = workload.build_retry_workload(sample, depth, seed)
    table = workload.create_trip_table(dynamodb, "bench-replay")
    queue = workload.create_retry_queue(sqs, "bench-replay")
    try:
        fill_seconds = workload.fill_queue(settings, queue.url, built.bodies)
        scan_ms = workload.time_queue_scans(sqs, queue.url)
        progress.say(
            f"replay at {depth:,}: queue filled in {fill_seconds:,.1f} s "
            f"(GetQueueAttributes {scan_ms:,.1f} ms), starting the job"
        )

        run_dir = work_dir / f"replay-{depth}"
        run_dir.mkdir(parents=True, exist_ok=True)
        arguments = [
            "replay",
            "--endpoint-url",
            settings.endpoint_url,
            "--region",
            settings.region,
            "--table",
            table,
            "--queue-url",
            queue.url,
            "--dead-letter-url",
            queue.dead_letter_url,
            "--work-dir",
            str(run_dir),
            "--max-runtime-seconds",
            str(JOB_TIME_LIMIT_SECONDS),
        ]
        if ministack_pid is not None:
            arguments += ["--ministack-pid", str(ministack_pid)]
        for setting in spark_conf:
            arguments += ["--spark-conf", setting]
        if wait_time_seconds is not None:
            arguments += ["--wait-time-seconds", str(wait_time_seconds)]
        job = _run_job_process(
            arguments,
            run_dir / "result.json",
            run_dir / "job.log",
            JOB_TIME_LIMIT_SECONDS + SUBPROCESS_GRACE_SECONDS,
        )
        items = workload.count_items(dynamodb, table)
        left = workload.queue_depths(sqs, queue.url)
        dead_lettered = workload.queue_depths(sqs, queue.dead_letter_url)["ApproximateNumberOfMessages"]
    finally:
        workload.delete_retry_queue(sqs, queue)
        workload.delete_trip_table(dynamodb, table)

    outcomes = job["report"]["outcomes"]
    handled = sum(outcomes.get(name, 0) for name in ("applied", "duplicate", "stale"))
    complete = (
        job["report"]["stop_reason"] == "queue drained"
        and handled == depth
        and items == built.trips
        and not any(left.values())
        and dead_lettered == 0
    )
    result = {
        "depth": depth,
        "workload": built.describe(),
        "fill_seconds": round(fill_seconds, 2),
        "queue_scan_ms": round(scan_ms, 2),
        "messages_per_second": round(depth / job["run_seconds"], 1),
        "messages_per_second_with_start": round(depth / job["total_seconds"], 1),
        "seconds_per_message": job["run_seconds"] / depth,
        "complete": complete,
        "items": items,
        "expected_items": built.trips,
        "left_on_queue": left,
        "dead_lettered": dead_lettered,
        "job": job,
    }
    progress.say(
        f"replay at {depth:,}: {result['messages_per_second']:,.1f} messages/s "
        f"({job['run_seconds']:,.1f} s, Spark start {job['spark_start_seconds']:,.1f} s), "
        f"driver peak {job['driver_peak_rss_mib']:,.0f} MiB, "
        f"JVM peak {job['memory']['jvm_peak_rss_mib']:,.0f} MiB"
        + ("" if complete else " - INCOMPLETE, see the JSON result")
    )
    return result


def run_functions(
    settings: AwsSettings,
    data: str | None,
    seed: int,
    batch_sizes: list[int],
    invocations: int,
    import_runs: int,
    work_dir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Measure both handlers against fresh resources, then their cold import time."""
    sqs = settings.client("sqs")
    sns = settings.client("sns")
    dynamodb = settings.client("dynamodb")
    table = workload.create_trip_table(dynamodb, "bench-functions")
    retry_url = sqs.create_queue(QueueName=workload.unique_name("bench-functions-retry"))["QueueUrl"]
    topic_arn = sns.create_topic(Name=workload.unique_name("bench-functions-invalid"))["TopicArn"]
    result_path = work_dir / "functions.json"
    environment = _python_environment()
    environment.update(
        {
            "TABLE_NAME": table,
            "INVALID_TOPIC_ARN": topic_arn,
            "RETRY_QUEUE_URL": retry_url,
            "POWERTOOLS_METRICS_NAMESPACE": "TaxiPipelineBench",
            "POWERTOOLS_SERVICE_NAME": "bench",
            "AWS_ENDPOINT_URL": settings.endpoint_url,
        }
    )
    command = [
        sys.executable,
        "-m",
        "bench.functions",
        "--batch-sizes",
        ",".join(str(size) for size in batch_sizes),
        "--invocations",
        str(invocations),
        "--seed",
        str(seed),
        "--result",
        str(result_path),
    ]
    if data:
        command += ["--data", data]
    try:
        # The handlers write a log line and metrics to standard output per invocation.
        completed = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=REPO_ROOT,
            timeout=600,
            check=False,
        )
    finally:
        sns.delete_topic(TopicArn=topic_arn)
        sqs.delete_queue(QueueUrl=retry_url)
        workload.delete_trip_table(dynamodb, table)
    if completed.returncode != 0:
        raise RuntimeError(f"the function benchmark failed: {completed.stderr[-2000:]}")
    handlers = json.loads(result_path.read_text())
    progress.say("stream functions measured, timing cold imports")
    imports = measure_import_times(import_runs)
    progress.say(
        "cold import: "
        + ", ".join(f"{kind} {values['median_ms']:,.0f} ms" for kind, values in imports.items())
    )
    return {"handlers": handlers, "imports": imports, "batch_sizes": batch_sizes}


def run_backfill_bench(
    settings: AwsSettings,
    sample: Any,
    rows: int,
    seed: int,
    work_dir: Path,
    ministack_pid: int | None,
    progress: Progress,
    spark_conf: Sequence[str] = (),
) -> dict[str, Any]:
    """Write a Parquet source of ``rows`` events and apply it with ``run_backfill``."""
    dynamodb = settings.client("dynamodb")
    source_dir = Path(tempfile.mkdtemp(prefix="bench-backfill-source-"))
    table = workload.create_trip_table(dynamodb, "bench-backfill")
    try:
        source = write_backfill_source(sample, rows, source_dir, seed)
        progress.say(f"backfill source written: {source['rows']:,} rows, starting the job")
        run_dir = work_dir / "backfill"
        run_dir.mkdir(parents=True, exist_ok=True)
        arguments = [
            "backfill",
            "--endpoint-url",
            settings.endpoint_url,
            "--region",
            settings.region,
            "--table",
            table,
            "--source",
            str(source_dir),
            "--work-dir",
            str(run_dir),
        ]
        if ministack_pid is not None:
            arguments += ["--ministack-pid", str(ministack_pid)]
        for setting in spark_conf:
            arguments += ["--spark-conf", setting]
        job = _run_job_process(
            arguments,
            run_dir / "result.json",
            run_dir / "job.log",
            JOB_TIME_LIMIT_SECONDS + SUBPROCESS_GRACE_SECONDS,
        )
        items = workload.count_items(dynamodb, table)
    finally:
        workload.delete_trip_table(dynamodb, table)
        shutil.rmtree(source_dir, ignore_errors=True)

    result = {
        "rows": source["rows"],
        "trips": source["trips"],
        "rows_per_second": round(source["rows"] / job["run_seconds"], 1),
        "rows_per_second_with_start": round(source["rows"] / job["total_seconds"], 1),
        "complete": job["report"]["stop_reason"] == "source applied" and items == source["trips"],
        "items": items,
        "job": job,
    }
    progress.say(f"backfill: {result['rows_per_second']:,.1f} rows/s ({job['run_seconds']:,.1f} s)")
    return result


# --- The run -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """The sizes of one benchmark run, from the command-line options."""

    depths: list[int]
    baseline_depths: list[int]
    ceiling_levels: tuple[tuple[int, int], ...]
    ceiling_seconds: float
    backfill_rows: int
    batch_sizes: tuple[int, ...]
    invocations: int
    import_runs: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunPlan:
        depths = args.depths or list(QUICK_DEPTHS if args.quick else DEFAULT_DEPTHS)
        if args.quick:
            baseline_depths = [min(depths)]
        else:
            baseline_depths = [depth for depth in BASELINE_DEPTHS if depth <= max(depths)] or [min(depths)]
        return cls(
            depths=depths,
            baseline_depths=baseline_depths,
            ceiling_levels=QUICK_CEILING_LEVELS if args.quick else ceiling.DEFAULT_LEVELS,
            ceiling_seconds=args.ceiling_seconds or (2.0 if args.quick else 5.0),
            backfill_rows=args.backfill_rows or (4_000 if args.quick else 100_000),
            batch_sizes=FUNCTION_BATCH_SIZES,
            invocations=1 if args.quick else 3,
            import_runs=3 if args.quick else 7,
        )


def measure_all(
    args: argparse.Namespace, plan: RunPlan, sample: Any, endpoint: LocalEndpoint, progress: Progress
) -> dict[str, Any]:
    """Run every measurement against the started endpoint and return their results by name."""
    settings = AwsSettings(region=REGION, endpoint_url=endpoint.url)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    results: dict[str, Any] = {}

    results["ceiling"] = run_ceiling(
        settings, sample, args.seed, plan.ceiling_levels, plan.ceiling_seconds, endpoint.pid, progress
    )
    results["baseline"] = run_baseline(
        settings, sample, plan.baseline_depths, args.seed, args.baseline_budget_seconds, progress
    )
    results["replay"] = [
        run_replay_depth(
            settings,
            sample,
            depth,
            args.seed + depth,
            work_dir,
            endpoint.pid,
            args.wait_time_seconds,
            progress,
            args.spark_conf,
        )
        for depth in plan.depths
    ]
    if not args.skip_functions:
        results["functions"] = run_functions(
            settings,
            args.data,
            args.seed,
            list(plan.batch_sizes),
            plan.invocations,
            plan.import_runs,
            work_dir,
            progress,
        )
    if not args.skip_backfill:
        results["backfill"] = run_backfill_bench(
            settings, sample, plan.backfill_rows, args.seed, work_dir, endpoint.pid, progress, args.spark_conf
        )

    # The job logs stay behind only when a step fails, for its error message.
    shutil.rmtree(work_dir, ignore_errors=True)
    return results


def publish(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the figures, and write the JSON file, the document and the plot that the options ask for."""
    print()
    print(report.render_console(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if args.no_document:
        return
    plot_path = None if args.no_plot else args.output.parent / PLOT_NAME
    if plot_path is not None:
        report.plot_throughput(results, plot_path)
    report.update_document(args.output, report.render_markdown(results, plot_path, args.output))
    print(f"\nwrote {args.output}" + (f" and {plot_path}" if plot_path else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.from_json:
        results = json.loads(args.from_json.read_text(encoding="utf-8"))
        results["targets"] = report.evaluate_targets(results)
        results["estimate"] = estimate_glue_throughput(results)
        publish(results, args)
        return 0

    progress = Progress()
    use_local_credentials()
    plan = RunPlan.from_args(args)

    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe_machine(),
        "replay_settings": {"wait_time_seconds": args.wait_time_seconds, "spark_conf": args.spark_conf},
    }
    sample = workload.load_trips(args.data, args.seed)
    results["sample"] = {
        "source": sample.source,
        "synthetic": sample.synthetic,
        "trips": len(workload.trip_pairs(sample)),
    }
    progress.say(f"trips from {sample.source}; depths {', '.join(f'{depth:,}' for depth in plan.depths)}")

    endpoint = LocalEndpoint(region=REGION)
    try:
        endpoint.start()
    except LocalEndpointError as exc:
        print(f"error: the local AWS endpoint did not start: {exc}", file=sys.stderr)
        return 1
    try:
        use_local_credentials(endpoint.url)
        progress.say(f"MiniStack at {endpoint.url} (pid {endpoint.pid})")
        results.update(measure_all(args, plan, sample, endpoint, progress))
    finally:
        endpoint.stop()

    results["load_average_at_end"] = load_average()
    results["total_seconds"] = round(time.perf_counter() - progress.started, 1)
    results["targets"] = report.evaluate_targets(results)
    results["estimate"] = estimate_glue_throughput(results)
    publish(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
