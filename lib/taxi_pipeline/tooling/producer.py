"""Put start and end events on the two Kinesis streams the way real traffic arrives.

``plan_traffic`` turns a ``TripSample`` into a list of records spread over
send waves. Most end events go out after their trip's start event and some
before it, and some records are sent twice. One deliberately corrupted copy
of a real row per kind of invalid event goes along, each with the reason
code the stream functions must give it. ``send_traffic``
puts the waves with ``PutRecords`` and records what was sent.

Rows are serialised without losing digits: a float goes out through its
shortest ``repr`` (what ``json.dumps`` writes for floats too), and a
``Decimal`` read from JSON Lines goes out digit for digit.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from taxi_pipeline.tooling.sample import TripSample

logger = logging.getLogger(__name__)

START = "start"
END = "end"
DEFAULT_START_STREAM = "start-trip-stream"
DEFAULT_END_STREAM = "end-trip-stream"

# PutRecords accepts at most 500 records and 5 MiB (data plus partition
# keys) per call; each record is at most 1 MiB.
MAX_RECORDS_PER_CALL = 500
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 8
RETRY_BASE_DELAY_SECONDS = 0.1
RETRY_MAX_DELAY_SECONDS = 5.0

DEFAULT_RECORDS_PER_WAVE = 40
DEFAULT_WAVE_PAUSE_SECONDS = 0.25
DEFAULT_DUPLICATE_SHARE = 0.05
DEFAULT_ENDS_FIRST_SHARE = 0.1

ROLE_EVENT = "event"
ROLE_DUPLICATE = "duplicate"
ROLE_CORRUPTED = "corrupted"


class ProduceError(RuntimeError):
    """Records that Kinesis still rejected after every retry."""


@dataclass(frozen=True)
class PlannedRecord:
    """One record to put: its stream kind, key, bytes and role in the demo.

    ``expected_reason`` is the reason code a corrupted record must be
    rejected with; ``None`` for valid records.
    """

    kind: str
    trip_id: str
    data: bytes
    role: str
    wave: int
    corruption: str | None = None
    expected_reason: str | None = None


@dataclass(frozen=True)
class SentRecord:
    """One record as Kinesis accepted it."""

    stream: str
    kind: str
    trip_id: str
    role: str
    wave: int
    shard_id: str
    sequence_number: str
    corruption: str | None = None
    expected_reason: str | None = None


@dataclass
class TrafficPlan:
    """The records to send, in send order, and how they were arranged."""

    records: list[PlannedRecord]
    waves: int
    ends_first_trips: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Count the planned records by role."""
        return dict(Counter(record.role for record in self.records))


@dataclass
class ProduceResult:
    """The records ``send_traffic`` put on the streams, and the counts of its calls."""

    records: list[SentRecord]
    put_calls: int = 0
    retried_entries: int = 0
    duration_seconds: float = 0.0
    ends_first_trips: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Count the sent records by role, plus ``total``."""
        counts = Counter(record.role for record in self.records)
        return {
            "total": len(self.records),
            ROLE_EVENT: counts[ROLE_EVENT],
            ROLE_DUPLICATE: counts[ROLE_DUPLICATE],
            ROLE_CORRUPTED: counts[ROLE_CORRUPTED],
            "ends_first_trips": len(self.ends_first_trips),
        }

    def corrupted(self) -> list[SentRecord]:
        """Return the corrupted records, in send order."""
        return [record for record in self.records if record.role == ROLE_CORRUPTED]

    def valid_event_keys(self) -> Counter[tuple[str, str]]:
        """Count the valid records sent per event ``(trip_id, kind)``, duplicates included."""
        return Counter(
            (record.trip_id, record.kind) for record in self.records if record.role != ROLE_CORRUPTED
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description of the run, without record contents."""
        return {
            "counts": self.counts(),
            "put_calls": self.put_calls,
            "retried_entries": self.retried_entries,
            "duration_seconds": round(self.duration_seconds, 3),
            "ends_first_trips": list(self.ends_first_trips),
            "records": [asdict(record) for record in self.records],
        }


def encode_row(row: Mapping[str, Any]) -> bytes:
    """Serialise a row to compact UTF-8 JSON without losing any digit.

    Raises ``ValueError`` for a non-finite number, because JSON has none.
    """
    return _encode_value(row).encode("utf-8")


def _encode_value(value: Any) -> str:
    if isinstance(value, Mapping):
        members = (
            f"{json.dumps(str(name), ensure_ascii=False)}:{_encode_value(item)}"
            for name, item in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode_value(item) for item in value) + "]"
    if value is None or isinstance(value, bool | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} cannot be written as JSON")
        return repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value!r} cannot be written as JSON")
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON: {value!r}")


# --- Corrupted copies ---------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """One kind of invalid event, made from a copy of a real row."""

    name: str
    kind: str
    expected_reason: str
    make: Callable[[dict[str, Any]], bytes]
    # Rows this corruption can be made from; every row by default.
    applies_to: Callable[[dict[str, Any]], bool] = lambda row: True


def _without_trip_id(row: dict[str, Any]) -> bytes:
    return encode_row({name: value for name, value in row.items() if name != "trip_id"})


def _not_utf8(row: dict[str, Any]) -> bytes:
    # A 0xFF byte never occurs in UTF-8. It goes inside an existing text
    # value, so a decoder that replaced it would write a visibly wrong value.
    data = encode_row(row)
    marker = b'"fare_type":"'
    return data.replace(marker, marker + b"\xff", 1) if marker in data else data[:-1] + b',"x":"\xff"}'


def _with_nan_tip(row: dict[str, Any]) -> bytes:
    return encode_row({**row, "tip": None}).replace(b'"tip":null', b'"tip":NaN', 1)


def _with_negative_total(row: dict[str, Any]) -> bytes:
    return encode_row({**row, "total_fare_amount": -abs(row["total_fare_amount"])})


def _has_positive_total(row: dict[str, Any]) -> bool:
    value = row.get("total_fare_amount")
    try:
        return value is not None and Decimal(str(value).replace(",", "")) > 0
    except ArithmeticError:
        return False


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("not_json", START, "body_not_json", lambda row: encode_row(row)[:-1]),
    Corruption("not_utf8", END, "body_not_utf8", _not_utf8),
    Corruption("not_an_object", START, "body_not_object", lambda row: b"[" + encode_row(row) + b"]"),
    Corruption("nan_number", END, "number_not_finite", _with_nan_tip),
    Corruption("missing_trip_id", START, "trip_id_missing", _without_trip_id),
    Corruption("empty_trip_id", END, "trip_id_empty", lambda row: encode_row({**row, "trip_id": ""})),
    Corruption(
        "wrong_type",
        START,
        "wrong_type",
        lambda row: encode_row({**row, "hail_type": {"value": row.get("hail_type")}}),
    ),
    Corruption(
        "bad_timestamp",
        END,
        "timestamp_invalid",
        lambda row: encode_row({**row, "end_time_local": "2023/02/30 25:61:00 PM"}),
    ),
    Corruption(
        "negative_money",
        END,
        "money_negative",
        _with_negative_total,
        applies_to=_has_positive_total,
    ),
    Corruption(
        "coordinate_out_of_range",
        START,
        "coordinate_out_of_range",
        lambda row: encode_row({**row, "pickup_location_latitude": 123.456}),
    ),
)


def corrupted_records(sample: TripSample, rng: random.Random, waves: int) -> list[PlannedRecord]:
    """Make one corrupted copy of a real row per entry of ``CORRUPTIONS``."""
    rows = {START: list(sample.start_rows), END: list(sample.end_rows)}
    records: list[PlannedRecord] = []
    for corruption in CORRUPTIONS:
        candidates = [row for row in rows[corruption.kind] if corruption.applies_to(row)]
        if not candidates:
            logger.warning(
                "no %s row suits the %s corruption; it is not sent",
                corruption.kind,
                corruption.name,
            )
            continue
        row = dict(rng.choice(candidates))
        records.append(
            PlannedRecord(
                kind=corruption.kind,
                trip_id=row["trip_id"],
                data=corruption.make(row),
                role=ROLE_CORRUPTED,
                wave=rng.randrange(waves),
                corruption=corruption.name,
                expected_reason=corruption.expected_reason,
            )
        )
    return records


# --- Planning -------------------------------------------------------------------


def plan_traffic(
    sample: TripSample,
    seed: int = 0,
    *,
    records_per_wave: int = DEFAULT_RECORDS_PER_WAVE,
    duplicate_share: float = DEFAULT_DUPLICATE_SHARE,
    ends_first_share: float = DEFAULT_ENDS_FIRST_SHARE,
    corrupt: bool = True,
) -> TrafficPlan:
    """Arrange the sample's rows into send waves, as real traffic would arrive.

    Each trip's start goes in some wave and its end one or two waves later,
    except for ``ends_first_share`` of the trips, whose end goes one wave
    before the start. ``duplicate_share`` of the records are sent a second
    time, in the same wave or up to two waves later. With ``corrupt``, one
    corrupted copy of a real row per kind of invalid event is added.
    """
    for name, share in (
        ("duplicate share", duplicate_share),
        ("ends-first share", ends_first_share),
    ):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} {share!r} is invalid: use a share from 0 to 1")
    if records_per_wave < 1:
        raise ValueError(f"records per wave {records_per_wave} is invalid: use at least 1")

    rng = random.Random(seed)
    starts = {row["trip_id"]: row for row in sample.start_rows}
    ends = {row["trip_id"]: row for row in sample.end_rows}
    trip_ids = sample.trip_ids()
    rng.shuffle(trip_ids)
    waves = max(3, math.ceil((len(starts) + len(ends)) / records_per_wave))

    records, ends_first = _place_events(trip_ids, starts, ends, rng, waves, ends_first_share)
    records += _duplicates(records, rng, waves, duplicate_share)
    if corrupt:
        records += corrupted_records(sample, rng, waves)

    # Records of one wave go out in a shuffled order, stable for the seed.
    order = {id(record): rng.random() for record in records}
    records.sort(key=lambda record: (record.wave, order[id(record)]))
    return TrafficPlan(records=records, waves=waves, ends_first_trips=sorted(ends_first))


def _place_events(
    trip_ids: list[str],
    starts: dict[str, dict[str, Any]],
    ends: dict[str, dict[str, Any]],
    rng: random.Random,
    waves: int,
    ends_first_share: float,
) -> tuple[list[PlannedRecord], list[str]]:
    records: list[PlannedRecord] = []
    ends_first: list[str] = []
    complete = [trip_id for trip_id in trip_ids if trip_id in starts and trip_id in ends]
    chosen_first = set(rng.sample(complete, round(len(complete) * ends_first_share))) if complete else set()
    if ends_first_share > 0 and complete and not chosen_first:
        chosen_first = {complete[0]}

    for position, trip_id in enumerate(trip_ids):
        # Starts are spread over all waves but the last, so an end has a later wave to go to.
        start_wave = position * (waves - 1) // max(len(trip_ids), 1)
        end_wave = min(waves - 1, start_wave + rng.choice((1, 1, 2)))
        if trip_id in chosen_first:
            start_wave = max(start_wave, 1)
            end_wave = start_wave - 1
            ends_first.append(trip_id)

        if trip_id in starts:
            records.append(PlannedRecord(START, trip_id, encode_row(starts[trip_id]), ROLE_EVENT, start_wave))
        if trip_id in ends:
            records.append(PlannedRecord(END, trip_id, encode_row(ends[trip_id]), ROLE_EVENT, end_wave))
    return records, ends_first


def _duplicates(
    records: list[PlannedRecord], rng: random.Random, waves: int, share: float
) -> list[PlannedRecord]:
    if not records or share <= 0:
        return []
    originals = rng.sample(records, max(1, round(len(records) * share)))
    return [
        PlannedRecord(
            kind=record.kind,
            trip_id=record.trip_id,
            data=record.data,
            role=ROLE_DUPLICATE,
            wave=min(waves - 1, record.wave + rng.choice((0, 1, 2))),
        )
        for record in originals
    ]


# --- Sending --------------------------------------------------------------------


def send_traffic(
    kinesis: Any,
    plan: TrafficPlan,
    *,
    start_stream: str = DEFAULT_START_STREAM,
    end_stream: str = DEFAULT_END_STREAM,
    wave_pause_seconds: float = DEFAULT_WAVE_PAUSE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> ProduceResult:
    """Put every planned record, wave by wave, and return what Kinesis accepted.

    Within a wave, each stream gets its records through ``PutRecords`` calls
    of at most 500 records and 5 MiB. A wave ends before the next begins,
    and ``wave_pause_seconds`` between waves lets the stream functions read
    one wave before the next arrives.
    """
    streams = {START: start_stream, END: end_stream}
    result = ProduceResult(records=[], ends_first_trips=list(plan.ends_first_trips))
    started = time.monotonic()

    for wave in range(plan.waves):
        wave_records = [record for record in plan.records if record.wave == wave]
        for kind, stream in streams.items():
            batch = [record for record in wave_records if record.kind == kind]
            for call in _calls(batch):
                sent, calls, retried = put_records(
                    kinesis, stream, call, max_attempts=max_attempts, sleep=sleep
                )
                result.records.extend(sent)
                result.put_calls += calls
                result.retried_entries += retried
        logger.debug("wave %d of %d sent (%d records)", wave + 1, plan.waves, len(wave_records))
        if wave_pause_seconds > 0 and wave < plan.waves - 1:
            sleep(wave_pause_seconds)

    result.duration_seconds = time.monotonic() - started
    logger.info(
        "sent %d records in %d PutRecords calls (%d entries retried)",
        len(result.records),
        result.put_calls,
        result.retried_entries,
    )
    return result


def _calls(records: list[PlannedRecord]) -> Iterator[list[PlannedRecord]]:
    """Split records into PutRecords calls within the count and size limits."""
    call: list[PlannedRecord] = []
    size = 0
    for record in records:
        record_size = len(record.data) + len(record.trip_id.encode("utf-8"))
        if call and (len(call) == MAX_RECORDS_PER_CALL or size + record_size > MAX_BYTES_PER_CALL):
            yield call
            call, size = [], 0
        call.append(record)
        size += record_size
    if call:
        yield call


def put_records(
    kinesis: Any,
    stream_name: str,
    records: list[PlannedRecord],
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[SentRecord], int, int]:
    """Put up to 500 records with one call, then retry only the entries that failed.

    Returns the sent records in the order Kinesis accepted them, the number
    of calls and the number of retried entries. A retried record can land
    after records that were behind it; that is how a real producer's retries
    reorder traffic too. Raises ``ProduceError`` when entries still fail
    after ``max_attempts`` calls.
    """
    pending = list(records)
    sent: list[SentRecord] = []
    calls = retried = 0
    for attempt in range(1, max_attempts + 1):
        response = kinesis.put_records(
            StreamName=stream_name,
            Records=[{"Data": record.data, "PartitionKey": record.trip_id} for record in pending],
        )
        calls += 1

        failed: list[PlannedRecord] = []
        error_codes: Counter[str] = Counter()
        for record, entry in zip(pending, response["Records"], strict=True):
            if entry.get("ErrorCode"):
                failed.append(record)
                error_codes[entry["ErrorCode"]] += 1
                continue
            sent.append(
                SentRecord(
                    stream=stream_name,
                    kind=record.kind,
                    trip_id=record.trip_id,
                    role=record.role,
                    wave=record.wave,
                    shard_id=entry["ShardId"],
                    sequence_number=entry["SequenceNumber"],
                    corruption=record.corruption,
                    expected_reason=record.expected_reason,
                )
            )
        if not failed:
            return sent, calls, retried

        delay = min(RETRY_MAX_DELAY_SECONDS, RETRY_BASE_DELAY_SECONDS * 2 ** (attempt - 1))
        logger.warning(
            "PutRecords to %s: %d of %d entries failed (%s), attempt %d of %d, retrying in %.1f s",
            stream_name,
            len(failed),
            len(pending),
            dict(error_codes),
            attempt,
            max_attempts,
            delay,
        )
        if attempt < max_attempts:
            retried += len(failed)
            pending = failed
            sleep(delay)

    raise ProduceError(
        f"{len(failed)} records to stream {stream_name} failed after {max_attempts} PutRecords "
        f"calls ({dict(error_codes)}); check the stream's capacity and retry"
    )


# --- Run manifest -----------------------------------------------------------------

MANIFEST_VERSION = 1


def write_manifest(
    path: Path,
    sample: TripSample,
    result: ProduceResult,
    *,
    stack_name: str,
    limit: int | None,
    check_queue_url: str | None,
    synthetic_trips: int | None = None,
) -> None:
    """Record a produce run in a JSON file, so that ``verify`` can check it later.

    The manifest names the data source and the trips sent, never row
    contents: ``verify`` reads the rows again from the source, or generates
    the synthetic trips again from ``synthetic_trips`` and the seed.
    """
    document = {
        "manifest_version": MANIFEST_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "stack_name": stack_name,
        "source": {
            "path": None if sample.synthetic else sample.source,
            "synthetic": sample.synthetic,
            "seed": sample.seed,
            "synthetic_trips": synthetic_trips,
            "description": sample.source,
            "limit": limit,
        },
        "trip_ids": sorted({record.trip_id for record in result.records if record.role != ROLE_CORRUPTED}),
        "check_queue_url": check_queue_url,
        **result.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest written by ``write_manifest``; raise ``ValueError`` if it is not one."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"manifest {path} not found: run `taxi-pipeline produce` first, or pass --manifest"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("manifest_version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} is not a produce manifest of version {MANIFEST_VERSION}: "
            "run `taxi-pipeline produce` again"
        )
    return document


def sent_records_of(manifest: Mapping[str, Any]) -> list[SentRecord]:
    """Return the sent records listed in a manifest."""
    return [SentRecord(**record) for record in manifest.get("records", [])]
