"""Factories for Kinesis stream events, Lambda contexts and handler modules.

Records have the shape Lambda gives a function subscribed to a Kinesis stream:
base64 ``data``, 56-digit sequence numbers, ``eventID`` of the form
``shardId-000000000000:<sequence number>`` and the stream's ARN. Bodies come
from dicts, text or bytes, or from the real sample rows, which are read from
the sample folder at test time and never copied into the repository.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from taxi_pipeline.events import EventKind

REGION = "us-east-1"
ACCOUNT_ID = "000000000000"
SHARD_ID = "shardId-000000000000"
STREAM_NAMES = {EventKind.START: "start-trip-stream", EventKind.END: "end-trip-stream"}
FUNCTION_NAMES = {EventKind.START: "start-taxi-trips", EventKind.END: "end-taxi-trips"}
SAMPLE_FILES = {
    EventKind.START: "start_taxi_trips_sample.parquet",
    EventKind.END: "end_taxi_trips_sample.parquet",
}
HANDLER_DIRECTORIES = {EventKind.START: "start_taxi_trips", EventKind.END: "end_taxi_trips"}

# A sequence number of the length Kinesis uses (56 digits). Records of one
# batch get consecutive numbers from here.
FIRST_SEQUENCE_NUMBER = 49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898
ARRIVAL_TIMESTAMP = 1_674_484_641.123

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def stream_arn(kind: EventKind) -> str:
    """Return the ARN of the stream that carries events of ``kind``."""
    return f"arn:aws:kinesis:{REGION}:{ACCOUNT_ID}:stream/{STREAM_NAMES[EventKind(kind)]}"


def sequence_number(offset: int) -> str:
    """Return the 56-digit sequence number ``offset`` places after the first one."""
    return str(FIRST_SEQUENCE_NUMBER + offset)


def encode_body(body: Mapping[str, Any] | str | bytes) -> bytes:
    """Encode an event body as a producer puts it on the stream, a mapping as compact JSON."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def kinesis_record(
    body: Mapping[str, Any] | str | bytes,
    kind: EventKind,
    sequence: str,
    *,
    partition_key: str | None = None,
    data: str | None = None,
    arrival_timestamp: float = ARRIVAL_TIMESTAMP,
) -> dict[str, Any]:
    """Build one record of a Kinesis event.

    ``data`` replaces the base64 of the body, to build a record whose data is
    not base64. The partition key is the body's trip id when it has one, as
    the producer sets it.
    """
    kind = EventKind(kind)
    if partition_key is None:
        trip_id = body.get("trip_id") if isinstance(body, Mapping) else None
        partition_key = str(trip_id) if trip_id else "no-trip-id"
    encoded = base64.b64encode(encode_body(body)).decode("ascii") if data is None else data
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": sequence,
            "data": encoded,
            "approximateArrivalTimestamp": arrival_timestamp,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{SHARD_ID}:{sequence}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT_ID}:role/{FUNCTION_NAMES[kind]}-role",
        "awsRegion": REGION,
        "eventSourceARN": stream_arn(kind),
    }


def kinesis_event(
    bodies: Iterable[Mapping[str, Any] | str | bytes], kind: EventKind, *, first_offset: int = 0
) -> dict[str, Any]:
    """Build a Kinesis event with one record per body, in consecutive sequence numbers."""
    records = [
        kinesis_record(body, kind, sequence_number(first_offset + offset))
        for offset, body in enumerate(bodies)
    ]
    return {"Records": records}


def sample_rows(sample_dir: Path, kind: EventKind) -> list[dict[str, Any]]:
    """Read the real sample rows of ``kind`` as dicts (floats stay floats, nulls are None)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(sample_dir) / SAMPLE_FILES[EventKind(kind)]).to_pylist()


def sample_event(sample_dir: Path, kind: EventKind, *, first_offset: int = 0) -> dict[str, Any]:
    """Build a Kinesis event carrying every real sample row of ``kind`` as JSON."""
    return kinesis_event(sample_rows(sample_dir, kind), kind, first_offset=first_offset)


@dataclass
class LambdaContextStub:
    """The attributes of ``LambdaContext`` that Powertools and the stream functions read."""

    function_name: str = "start-taxi-trips"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    remaining_time_in_millis: int = 60_000

    @property
    def invoked_function_arn(self) -> str:
        """Return the function ARN built from the function name."""
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        """Return the function's default log group name."""
        return f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        """Return the fixed remaining time."""
        return self.remaining_time_in_millis


def lambda_context(kind: EventKind) -> LambdaContextStub:
    """Return a context stub named after the function of ``kind``."""
    return LambdaContextStub(function_name=FUNCTION_NAMES[EventKind(kind)])


def load_handler_module(kind: EventKind) -> ModuleType:
    """Import a fresh copy of ``lambdas/<function>/app.py`` under a unique module name.

    Both handler files are named ``app.py``, so a plain import would return
    the same module for both. Each call executes the file again, which gives
    the handler an empty client cache, as in a new Lambda container.
    """
    directory = HANDLER_DIRECTORIES[EventKind(kind)]
    path = REPOSITORY_ROOT / "lambdas" / directory / "app.py"
    name = f"{directory}_app_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module
