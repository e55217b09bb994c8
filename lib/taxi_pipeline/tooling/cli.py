"""The ``taxi-pipeline`` command: run the pipeline's steps one by one, or the whole demo.

Every AWS command works against the local endpoint or a real stack on AWS.
The endpoint comes from ``--endpoint-url`` or ``AWS_ENDPOINT_URL``; without
either, the SDK's usual resolution reaches AWS. Stack resources are read
from the outputs of the stack named by ``--stack-name``.

Exit codes: 0 success, 1 a failed step or a failed check, 2 invalid input,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.tooling.faults import DEFAULT_FAILURE_RATE
from taxi_pipeline.tooling.sample import (
    DEFAULT_SAMPLE_DIR,
    REPO_ROOT,
    SAMPLE_DIR_VARIABLE,
    SampleFormatError,
    SampleNotFoundError,
    TripSample,
    locate_sample_files,
    resolve_sample_dir,
)

if TYPE_CHECKING:
    from taxi_pipeline.tooling.demo import PipelineResources

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_STACK_NAME = "taxi-pipeline"
DEFAULT_MANIFEST = REPO_ROOT / ".run" / "produce-manifest.json"
DEFAULT_BUILD_DIR = REPO_ROOT / "build"
DEFAULT_TEMPLATE = REPO_ROOT / "infra" / "template.yaml"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
LOCAL_REGION = "us-east-1"
BACKFILL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".csv": "csv"}


class UsageError(ValueError):
    """Invalid input on the command line; the message names the value and the fix."""


# --- Argument types ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use a whole number of at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use 0 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use 0 or a positive number")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use a share from 0 to 1, such as 0.2")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use KEY=VALUE")
    return key, value


def _endpoint_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use a URL such as http://127.0.0.1:4566")
    return text.rstrip("/")


# --- Parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="taxi-pipeline",
        description="Run the taxi-trip pipeline's steps against the local endpoint or AWS, "
        "or run the whole demo locally.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log the library's progress (INFO) and print the traceback of a failure",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    endpoint = commands.add_parser("endpoint", help="start, stop or show the local endpoint (MiniStack)")
    endpoint_actions = endpoint.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = endpoint_actions.add_parser("start", help="start MiniStack on 127.0.0.1 in the background")
    start.add_argument(
        "--port",
        metavar="PORT",
        type=_positive_int,
        help="TCP port on 127.0.0.1 (default: a free port)",
    )
    endpoint_actions.add_parser("stop", help="stop the MiniStack started by `endpoint start`")
    endpoint_actions.add_parser("status", help="show the MiniStack started by `endpoint start`")

    package = commands.add_parser(
        "package", help="build the function zips, the job script and the job library"
    )
    package.add_argument(
        "--out-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_BUILD_DIR,
        help=f"output folder (default: {DEFAULT_BUILD_DIR})",
    )

    deploy = commands.add_parser("deploy", help="upload the artifacts and create or update the stack")
    _add_aws_options(deploy)
    deploy.add_argument(
        "--template",
        metavar="FILE",
        type=Path,
        default=DEFAULT_TEMPLATE,
        help=f"template file (default: {DEFAULT_TEMPLATE})",
    )
    deploy.add_argument(
        "--artifacts-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_BUILD_DIR,
        help=f"folder built by `taxi-pipeline package` (default: {DEFAULT_BUILD_DIR})",
    )
    deploy.add_argument("--package", action="store_true", help="build the artifacts first")
    deploy.add_argument(
        "--bucket",
        metavar="NAME",
        help="artifact bucket (default: <stack-name>-artifacts-<account>-<region>, created if missing)",
    )
    deploy.add_argument(
        "--parameter",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="template parameter, such as NameSuffix=-staging; repeat for more",
    )
    deploy.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=1800.0,
        help="seconds to wait for the stack (default: 1800)",
    )

    produce = commands.add_parser("produce", help="put start and end events on the two streams")
    _add_aws_options(produce)
    _add_data_options(produce)
    produce.add_argument(
        "--duplicate-share",
        metavar="SHARE",
        type=_share,
        default=0.05,
        help="share of records sent a second time, 0 to 1 (default: 0.05)",
    )
    produce.add_argument(
        "--ends-first-share",
        metavar="SHARE",
        type=_share,
        default=0.1,
        help="share of trips whose end event is sent before the start, 0 to 1 (default: 0.1)",
    )
    produce.add_argument("--no-corrupt", action="store_true", help="send no corrupted records")
    produce.add_argument(
        "--wave-pause",
        metavar="SECONDS",
        type=_non_negative_float,
        default=0.25,
        help="seconds between send waves (default: 0.25)",
    )
    produce.add_argument(
        "--no-check-queue",
        action="store_true",
        help="do not create the queue <stack-name>-invalid-trips-check, "
        "subscribed to the invalid-trips topic",
    )
    produce.add_argument(
        "--manifest",
        metavar="FILE",
        type=Path,
        default=DEFAULT_MANIFEST,
        help=f"record of the run for `verify` (default: {DEFAULT_MANIFEST})",
    )

    replay = commands.add_parser(
        "replay", help="drain the retry queue into the table with a local Spark session"
    )
    _add_aws_options(replay)
    replay.add_argument("--queue-url", metavar="URL", help="retry queue (default: the stack's RetryQueueUrl)")
    replay.add_argument(
        "--table-name", metavar="NAME", help="trip table (default: the stack's TripTableName)"
    )
    replay.add_argument(
        "--dead-letter-queue-url",
        metavar="URL",
        help="dead-letter queue (default: the stack's DeadLetterQueueUrl)",
    )
    replay.add_argument(
        "--max-messages",
        metavar="N",
        type=_positive_int,
        help="stop after receiving this many messages",
    )
    replay.add_argument(
        "--max-runtime",
        metavar="SECONDS",
        type=_positive_float,
        default=3300.0,
        help="seconds after which no new wave starts (default: 3300)",
    )
    replay.add_argument(
        "--wait-time",
        metavar="SECONDS",
        type=_non_negative_int,
        default=10,
        help="long-poll wait of each receive, 0 to 20 seconds (default: 10)",
    )
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="receive and report one wave; write and delete nothing",
    )
    replay.add_argument(
        "--report", metavar="PATH", help="write the run report as JSON to this path or s3:// URI"
    )
    replay.add_argument(
        "--cores", metavar="N", type=_positive_int, default=2, help="local Spark cores (default: 2)"
    )

    backfill = commands.add_parser(
        "backfill", help="write start and end events from files with a local Spark session"
    )
    _add_aws_options(backfill)
    backfill.add_argument(
        "--source",
        metavar="PATH",
        help="folder, file or s3:// prefix of event files "
        f"(default: --data, ${SAMPLE_DIR_VARIABLE} or {DEFAULT_SAMPLE_DIR})",
    )
    backfill.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help="folder of start and end files; same as --source for a folder",
    )
    backfill.add_argument(
        "--format",
        choices=("auto", "parquet", "json", "csv"),
        default="auto",
        help="file format; json means JSON Lines (default: auto, from the file names)",
    )
    backfill.add_argument(
        "--table-name", metavar="NAME", help="trip table (default: the stack's TripTableName)"
    )
    backfill.add_argument("--rejects", metavar="DIR", help="write invalid rows as JSON Lines to this folder")
    backfill.add_argument(
        "--report", metavar="PATH", help="write the run report as JSON to this path or s3:// URI"
    )
    backfill.add_argument(
        "--cores", metavar="N", type=_positive_int, default=2, help="local Spark cores (default: 2)"
    )

    verify = commands.add_parser("verify", help="check the table and the queues against a produce run")
    _add_aws_options(verify)
    verify.add_argument(
        "--manifest",
        metavar="FILE",
        type=Path,
        default=DEFAULT_MANIFEST,
        help=f"record written by `produce` (default: {DEFAULT_MANIFEST})",
    )
    verify.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help="folder of start and end files (default: the one named in the manifest)",
    )
    verify.add_argument(
        "--expect-dead-letters",
        metavar="N",
        type=_non_negative_int,
        default=0,
        help="messages the dead-letter queue may hold (default: 0)",
    )
    verify.add_argument(
        "--max-details",
        metavar="N",
        type=_positive_int,
        default=10,
        help="mismatches listed per check (default: 10)",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    demo = commands.add_parser(
        "demo", help="run the whole pipeline locally with faults, replay and verification"
    )
    _add_data_options(demo)
    demo.add_argument(
        "--failure-rate",
        metavar="SHARE",
        type=_share,
        default=DEFAULT_FAILURE_RATE,
        help=f"share of events whose trip writes all fail, 0 to 1 (default: {DEFAULT_FAILURE_RATE})",
    )
    demo.add_argument(
        "--consume-timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=150.0,
        help="seconds to wait for the stream functions (default: 150)",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the endpoint running after the summary until Ctrl-C",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on standard output, and the progress on standard error",
    )
    return parser


def _add_aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        type=_endpoint_url,
        default=os.environ.get("AWS_ENDPOINT_URL"),
        help="AWS endpoint, such as the local one from `taxi-pipeline endpoint start` "
        "(default: $AWS_ENDPOINT_URL, else AWS itself)",
    )
    parser.add_argument(
        "--region",
        metavar="REGION",
        help="AWS Region (default: $AWS_REGION or the AWS configuration)",
    )
    parser.add_argument(
        "--stack-name",
        metavar="NAME",
        default=DEFAULT_STACK_NAME,
        help=f"CloudFormation stack (default: {DEFAULT_STACK_NAME})",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help=f"folder of start and end files (default: ${SAMPLE_DIR_VARIABLE}, else {DEFAULT_SAMPLE_DIR})",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="generate synthetic trips instead of reading files"
    )
    parser.add_argument(
        "--synthetic-trips",
        metavar="N",
        type=_positive_int,
        default=200,
        help="trips to generate with --synthetic (default: 200)",
    )
    parser.add_argument(
        "--limit",
        metavar="N",
        type=_positive_int,
        help="use only this many trips, a seeded random subset",
    )
    parser.add_argument(
        "--seed", metavar="N", type=int, default=7, help="seed of every random choice (default: 7)"
    )


# --- Shared helpers ------------------------------------------------------------------------------


def aws_settings(args: argparse.Namespace) -> AwsSettings:
    """Build client settings; a loopback endpoint gets dummy credentials and a default Region."""
    endpoint_url = args.endpoint_url
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint_url and urlsplit(endpoint_url).hostname in LOCAL_HOSTS:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        region = region or LOCAL_REGION
    return AwsSettings.from_env(region=region, endpoint_url=endpoint_url)


def load_sample(args: argparse.Namespace) -> TripSample:
    """Read or generate the trips that ``--data``, ``--synthetic`` and ``--limit`` select."""
    from taxi_pipeline.tooling.demo import load_trips

    sample = load_trips(args.data, args.synthetic, args.synthetic_trips, args.seed)
    return sample.limited(args.limit, args.seed)


def stack_resources(args: argparse.Namespace, settings: AwsSettings) -> PipelineResources:
    """Read the stack's resources from its outputs."""
    from taxi_pipeline.tooling.demo import PipelineResources

    return PipelineResources.from_stack(settings.client("cloudformation"), args.stack_name)


def local_spark(cores: int) -> Any:
    """Start a local Spark session bound to 127.0.0.1."""
    from taxi_pipeline.tooling.demo import start_local_spark

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return start_local_spark(cores)


# --- Commands ---------------------------------------------------------------------------


def command_endpoint(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling import local_endpoint

    if args.action == "start":
        record = local_endpoint.start_detached(port=args.port)
        state = "already running" if record["already_running"] else "started"
        print(f"MiniStack {state} at {record['url']} (pid {record['pid']}, log {record['log_path']})")
        print(f"  use:  export AWS_ENDPOINT_URL={record['url']}")
        print("  stop: taxi-pipeline endpoint stop")
        return EXIT_OK
    if args.action == "stop":
        record = local_endpoint.stop_detached()
        print(
            "No recorded MiniStack is running." if record is None else f"MiniStack at {record['url']} stopped"
        )
        return EXIT_OK
    record = local_endpoint.read_detached()
    if record is None:
        print("No recorded MiniStack is running.")
        return EXIT_FAILED
    print(f"MiniStack running at {record['url']} (pid {record['pid']}, log {record['log_path']})")
    return EXIT_OK


def command_package(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling.packaging import build_artifacts, format_manifest

    artifacts = build_artifacts(args.out_dir)
    print(format_manifest(artifacts, relative_to=REPO_ROOT))
    return EXIT_OK


def command_deploy(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling.deploy import deploy_stack
    from taxi_pipeline.tooling.packaging import build_artifacts

    settings = aws_settings(args)
    if args.package:
        build_artifacts(args.artifacts_dir)
    outputs = deploy_stack(
        args.stack_name,
        args.template,
        args.artifacts_dir,
        args.bucket,
        dict(args.parameter),
        settings,
        timeout_seconds=args.timeout,
    )
    print(f"stack {args.stack_name} deployed; outputs:")
    for name, value in sorted(outputs.items()):
        print(f"  {name:<28} {value}")
    return EXIT_OK


def command_produce(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling.demo import CHECK_QUEUE_SUFFIX, subscribe_check_queue
    from taxi_pipeline.tooling.producer import plan_traffic, send_traffic, write_manifest

    settings = aws_settings(args)
    sample = load_sample(args)
    if sample.synthetic:
        print(f"SYNTHETIC RUN: {sample.source}")
    resources = stack_resources(args, settings)

    check_queue_url = None
    if not args.no_check_queue:
        queue_name = args.stack_name + CHECK_QUEUE_SUFFIX
        check_queue_url = subscribe_check_queue(
            settings.client("sqs"), settings.client("sns"), resources.invalid_topic_arn, queue_name
        )
        print(f"check queue {queue_name} is subscribed to {resources.invalid_topic_arn}")

    plan = plan_traffic(
        sample,
        args.seed,
        duplicate_share=args.duplicate_share,
        ends_first_share=args.ends_first_share,
        corrupt=not args.no_corrupt,
    )
    result = send_traffic(
        settings.client("kinesis"),
        plan,
        start_stream=resources.start_stream,
        end_stream=resources.end_stream,
        wave_pause_seconds=args.wave_pause,
    )
    write_manifest(
        args.manifest,
        sample,
        result,
        stack_name=args.stack_name,
        limit=args.limit,
        check_queue_url=check_queue_url,
        synthetic_trips=args.synthetic_trips if sample.synthetic else None,
    )

    counts = result.counts()
    print(
        f"sent {counts['total']} records from {len(sample.trip_ids())} trips in {result.put_calls} "
        f"PutRecords calls: {counts['event']} events, {counts['duplicate']} sent twice, "
        f"{counts['corrupted']} corrupted, {counts['ends_first_trips']} trips with the end first"
    )
    print(f"manifest: {args.manifest}")
    return EXIT_OK


def command_replay(args: argparse.Namespace) -> int:
    from taxi_pipeline.replay import ReplayOptions, run_replay

    settings = aws_settings(args)
    resources = None if (args.queue_url and args.table_name) else stack_resources(args, settings)
    options = ReplayOptions(
        queue_url=args.queue_url or resources.retry_queue_url,
        table_name=args.table_name or resources.table_name,
        dead_letter_queue_url=args.dead_letter_queue_url
        or (resources.dead_letter_queue_url if resources else None),
        max_messages=args.max_messages,
        max_runtime_seconds=args.max_runtime,
        wait_time_seconds=args.wait_time,
        dry_run=args.dry_run,
        report_path=args.report,
    )
    spark = local_spark(args.cores)
    try:
        report = run_replay(spark, options, settings=settings)
    finally:
        spark.stop()
    print(report.render_text())
    return EXIT_OK


def backfill_source(args: argparse.Namespace) -> tuple[str, str]:
    """Return the backfill source and its format.

    A local folder is narrowed to its start and end files with a glob
    pattern (``DIR/{start_...,end_...}``), so that other files there, such as
    a README, are not read as events. Its format comes from their names.
    """
    source = args.source or str(resolve_sample_dir(args.data))
    if "://" in source or not Path(source).is_dir():
        return source, args.format
    start_path, end_path = locate_sample_files(Path(source))
    formats = {BACKFILL_FORMATS[start_path.suffix], BACKFILL_FORMATS[end_path.suffix]}
    if len(formats) > 1:
        raise UsageError(
            f"{start_path.name} and {end_path.name} in {source} have different formats: "
            "convert one, or backfill each file with --source FILE"
        )
    pattern = f"{Path(source).resolve()}/{{{start_path.name},{end_path.name}}}"
    return pattern, formats.pop() if args.format == "auto" else args.format


def command_backfill(args: argparse.Namespace) -> int:
    from taxi_pipeline.replay import BackfillOptions, run_backfill

    settings = aws_settings(args)
    source, source_format = backfill_source(args)
    table_name = args.table_name or stack_resources(args, settings).table_name
    options = BackfillOptions(
        source=source,
        table_name=table_name,
        source_format=source_format,
        rejects_path=args.rejects,
        report_path=args.report,
    )
    spark = local_spark(args.cores)
    try:
        report = run_backfill(spark, options, settings=settings)
    finally:
        spark.stop()
    print(report.render_text())
    return EXIT_OK if report.stop_reason == "source applied" else EXIT_FAILED


def command_verify(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling.demo import load_trips
    from taxi_pipeline.tooling.producer import ROLE_CORRUPTED, read_manifest, sent_records_of
    from taxi_pipeline.tooling.verify import ExpectedRejection, verify_run

    manifest = read_manifest(args.manifest)
    source = manifest["source"]
    if source["synthetic"]:
        sample = load_trips(None, True, source["synthetic_trips"], source["seed"])
        print(f"SYNTHETIC RUN: {sample.source}")
    else:
        sample = load_trips(args.data or Path(source["path"]), False, 0, 0)
    sample = sample.restricted_to(manifest["trip_ids"])
    missing = set(manifest["trip_ids"]) - set(sample.trip_ids())
    if missing:
        raise UsageError(
            f"{len(missing)} trips of the manifest are not in {sample.source}: "
            "pass --data with the folder that `produce` read"
        )

    settings = aws_settings(args)
    resources = stack_resources(args, settings)
    rejections = [
        ExpectedRejection(
            reason=record.expected_reason or "",
            trip_id=record.trip_id,
            corruption=record.corruption,
            stream=record.stream,
            sequence_number=record.sequence_number,
        )
        for record in sent_records_of(manifest)
        if record.role == ROLE_CORRUPTED
    ]
    report = verify_run(
        settings.client("dynamodb"),
        settings.client("sqs"),
        resources.verify_targets(manifest.get("check_queue_url")),
        sample.start_rows,
        sample.end_rows,
        rejections,
        expected_dead_letters=args.expect_dead_letters,
        max_details=args.max_details,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render_text())
        print("PASS" if report.passed else "FAIL")
    return EXIT_OK if report.passed else EXIT_FAILED


def command_demo(args: argparse.Namespace) -> int:
    from taxi_pipeline.tooling.demo import DemoOptions, run_demo

    # Reading the trips first turns a missing or unreadable folder into an
    # input error (exit code 2) before anything is started.
    sample = load_sample(args)
    options = DemoOptions(
        data_dir=args.data,
        synthetic=args.synthetic,
        synthetic_trips=args.synthetic_trips,
        failure_rate=args.failure_rate,
        limit=args.limit,
        seed=args.seed,
        keep_running=args.keep_running,
        consume_timeout_seconds=args.consume_timeout,
    )
    # With --json, standard output carries only the JSON document.
    progress = sys.stderr if args.json else sys.stdout
    result = run_demo(options, report=lambda line: print(line, file=progress, flush=True), sample=sample)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return EXIT_OK if result.passed else EXIT_FAILED


COMMANDS = {
    "endpoint": command_endpoint,
    "package": command_package,
    "deploy": command_deploy,
    "produce": command_produce,
    "replay": command_replay,
    "backfill": command_backfill,
    "verify": command_verify,
    "demo": command_demo,
}


def first_lines(message: str, count: int = 3) -> str:
    """Return the first lines of an error message; a Spark error carries a whole Java stack trace."""
    lines = message.strip().splitlines()
    if len(lines) <= count:
        return "\n".join(lines)
    return "\n".join(lines[:count]) + f"\n... ({len(lines) - count} more lines)"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("taxi_pipeline").setLevel(logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so the demo stops what it started.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; everything this command started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of standard output went away (as with `| head`); the
        # rest of the output has nowhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (
        UsageError,
        SampleNotFoundError,
        SampleFormatError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - every other failure is reported briefly
        if args.verbose:
            traceback.print_exc()
        print(f"error: {first_lines(str(exc))}", file=sys.stderr)
        if not args.verbose:
            print(f"for the full traceback, run: taxi-pipeline --verbose {args.command} ...", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
