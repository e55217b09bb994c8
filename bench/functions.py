"""Throughput and cold import time of the two stream functions.

``measure_handlers`` invokes each handler directly (no Lambda runtime) with
Kinesis events built as Lambda delivers them, against the local endpoint,
and reports records per second per invocation. The first invocation of a
freshly imported handler builds its AWS clients, so it is reported apart
as the cold invocation.

Run as ``python -m bench.functions`` it does this in a process of its own,
because Powertools writes a log line and metrics to standard output on
every invocation and the handlers read their configuration from the
environment.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.workload import ACCOUNT_ID, FUNCTION_NAMES, REGION, STREAM_ARNS, event_bodies, load_trips
from taxi_pipeline.events import EventKind

REPO_ROOT = Path(__file__).resolve().parents[1]
HANDLER_DIRECTORIES = {EventKind.START: "start_taxi_trips", EventKind.END: "end_taxi_trips"}
FIRST_SEQUENCE_NUMBER = 49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898
IMPORT_TIMER = (
    "import sys, time; sys.path.insert(0, sys.argv[1]); started = time.perf_counter(); "
    "import app; print(time.perf_counter() - started)"
)

logger = logging.getLogger(__name__)


@dataclass
class LambdaContextStub:
    """The attributes of a Lambda context that Powertools reads."""

    function_name: str
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def kinesis_event(bodies: Sequence[bytes], kind: EventKind, first_offset: int) -> dict[str, Any]:
    """Build a Kinesis event of one record per body, as Lambda delivers it to the function."""
    records = []
    for offset, body in enumerate(bodies):
        sequence = str(FIRST_SEQUENCE_NUMBER + first_offset + offset)
        trip_id = json.loads(body)["trip_id"]
        records.append(
            {
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": trip_id,
                    "sequenceNumber": sequence,
                    "data": base64.b64encode(body).decode("ascii"),
                    "approximateArrivalTimestamp": 1_674_484_641.123,
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": f"shardId-000000000000:{sequence}",
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT_ID}:role/{FUNCTION_NAMES[kind]}-role",
                "awsRegion": REGION,
                "eventSourceARN": STREAM_ARNS[kind],
            }
        )
    return {"Records": records}


def load_handler_module(kind: EventKind) -> ModuleType:
    """Import a fresh copy of ``lambdas/<function>/app.py``, as a new Lambda container would."""
    directory = HANDLER_DIRECTORIES[kind]
    path = REPO_ROOT / "lambdas" / directory / "app.py"
    spec = importlib.util.spec_from_file_location(f"{directory}_app_{uuid.uuid4().hex[:8]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_handlers(
    sample: Any,
    batch_sizes: Sequence[int],
    invocations: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Invoke each handler ``invocations`` times per batch size and return records per second.

    The handlers read their resources from the environment (``TABLE_NAME``,
    ``INVALID_TOPIC_ARN``, ``RETRY_QUEUE_URL``, ``POWERTOOLS_METRICS_NAMESPACE``).
    Every batch carries new trips, so every write is applied.
    """
    rng = random.Random(seed)
    results: dict[str, Any] = {}
    offset = 0
    for kind in (EventKind.START, EventKind.END):
        handler = load_handler_module(kind).lambda_handler
        context = LambdaContextStub(FUNCTION_NAMES[kind])
        per_kind: dict[str, Any] = {}

        cold_size = batch_sizes[0]
        cold_event = kinesis_event(event_bodies(sample, kind, cold_size, rng), kind, offset)
        offset += cold_size
        cold_seconds, cold_failures = _invoke(handler, cold_event, context)
        per_kind["cold"] = {
            "records": cold_size,
            "seconds": round(cold_seconds, 4),
            "records_per_second": round(cold_size / cold_seconds, 1),
            "failed_records": cold_failures,
        }

        for size in batch_sizes:
            rates = []
            failures = 0
            for _ in range(invocations):
                event = kinesis_event(event_bodies(sample, kind, size, rng), kind, offset)
                offset += size
                seconds, failed = _invoke(handler, event, context)
                rates.append(size / seconds)
                failures += failed
            per_kind[str(size)] = {
                "invocations": invocations,
                "median_records_per_second": round(statistics.median(rates), 1),
                "min_records_per_second": round(min(rates), 1),
                "max_records_per_second": round(max(rates), 1),
                "failed_records": failures,
            }
        results[kind.value] = per_kind
    return results


def _invoke(handler: Any, event: dict[str, Any], context: LambdaContextStub) -> tuple[float, int]:
    started = time.perf_counter()
    response = handler(event, context)
    seconds = time.perf_counter() - started
    return seconds, len(response.get("batchItemFailures", []))


def measure_import_times(runs: int, python: str = sys.executable) -> dict[str, Any]:
    """Time ``import app`` of each handler in ``runs`` fresh interpreters and return the medians.

    One more run with ``python -X importtime`` splits the time by top-level
    package. The bytecode caches of this checkout are warm, while a Lambda
    zip without ``.pyc`` files also compiles on its first import.
    """
    results: dict[str, Any] = {}
    for kind, directory in HANDLER_DIRECTORIES.items():
        folder = str(REPO_ROOT / "lambdas" / directory)
        seconds = []
        for _ in range(runs):
            completed = subprocess.run(
                [python, "-c", IMPORT_TIMER, folder],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            seconds.append(float(completed.stdout.strip().splitlines()[-1]))
        results[kind.value] = {
            "runs": runs,
            "median_ms": round(1000 * statistics.median(seconds), 1),
            "min_ms": round(1000 * min(seconds), 1),
            "max_ms": round(1000 * max(seconds), 1),
            "by_package_ms": import_time_by_package(python, folder),
        }
    return results


def import_time_by_package(python: str, folder: str) -> dict[str, float]:
    """Return the import time of ``import app`` per top-level package, largest first.

    Each module's own time (without the modules it imports) counts for its
    top-level package, so a package is charged for its own code however
    deeply it was imported.
    """
    completed = subprocess.run(
        [python, "-X", "importtime", "-c", f"import sys; sys.path.insert(0, {folder!r}); import app"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    totals: dict[str, float] = {}
    for line in completed.stderr.splitlines():
        # Lines read "import time: <self us> | <cumulative us> | <indented module name>".
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        own, _, name = line[len("import time:") :].split("|")
        if not own.strip().isdigit():
            continue  # the header line
        package = name.strip().split(".", 1)[0]
        totals[package] = totals.get(package, 0.0) + int(own) / 1000
    largest = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:6]
    return {package: round(milliseconds, 1) for package, milliseconds in largest}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.functions",
        description="Invoke the stream functions' handlers directly and measure records per second.",
    )
    parser.add_argument("--batch-sizes", default="100,500", help="records per invocation, comma-separated")
    parser.add_argument("--invocations", type=int, default=3, help="invocations per batch size (default: 3)")
    parser.add_argument(
        "--data", help="folder of the trip sample (default: $TAXI_SAMPLE_DIR or the shared sample)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated trip ids (default: 0)")
    parser.add_argument("--result", required=True, type=Path, help="file to write the JSON result to")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    missing = [
        name for name in ("TABLE_NAME", "INVALID_TOPIC_ARN", "RETRY_QUEUE_URL") if not os.environ.get(name)
    ]
    if missing:
        raise SystemExit(
            f"missing environment variables for the handlers: {', '.join(missing)}; "
            "set them to the trip table, the invalid-event topic and the retry queue"
        )
    batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    sample = load_trips(args.data, args.seed)
    result = measure_handlers(sample, batch_sizes, args.invocations, args.seed)
    args.result.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
