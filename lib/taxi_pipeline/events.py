"""Parse, normalise and validate start-trip and end-trip events.

An event arrives as raw bytes (a Kinesis record, an SQS message body) or as a
mapping (a row of a backfill file). ``parse_event`` turns it into a
``TripEvent`` whose attributes are ready for DynamoDB, or raises
``InvalidEventError`` listing every problem with a stable reason code.

Normalisation rules, all taken from the shape of the DataSF export:

* Numbers become exact ``Decimal`` values, never floats. Trailing zeros are
  dropped, so ``30.40`` is stored as ``30.4``. Strings with thousands
  separators (``"2,081,284"``) are numbers too.
* Timestamps in the portal's form (``2023/01/23 06:37:21 AM``) or ISO-8601
  become ISO-8601 strings with the San Francisco offset of that instant.
  A timestamp without a zone is San Francisco local time.
* The placeholder ``-`` for a driver id, empty strings and nulls all mean
  "no value": the attribute is absent from the item.
* Fields outside the schema are not written. The names of those with a
  value are kept in ``TripEvent.ignored_fields`` so that callers count and
  report them.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from taxi_pipeline.errors import InvalidEventError

SAN_FRANCISCO = ZoneInfo("America/Los_Angeles")

# A trip event with every schema field is under 1 KB. Anything far larger is
# not a trip event, and the cap keeps an invalid-event notification and a
# retry envelope well inside the 256 KB SNS and SQS message limits.
MAX_EVENT_BYTES = 64 * 1024
MAX_TRIP_ID_LENGTH = 256
MAX_TEXT_LENGTH = 256
VERSION_FIELD = "event_version"
MAX_VERSION = 10**18

# DynamoDB numbers carry at most 38 significant digits and an exponent
# between -130 and +125.
_DYNAMODB_CONTEXT = Context(prec=38)
_MIN_EXPONENT, _MAX_EXPONENT = -130, 125
_PORTAL_TIMESTAMP = "%Y/%m/%d %I:%M:%S %p"
# Plain decimals with optional thousands separators, or scientific notation.
_NUMBER_TEXT = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$|^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# Control characters, lone surrogates (not encodable as UTF-8) and U+FFFE,
# U+FFFF (which SQS rejects) in a trip id or a text value.
_INVALID_TEXT_CHARACTERS = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
MISSING_VALUE_PLACEHOLDERS = frozenset({"-"})


class EventKind(enum.StrEnum):
    """The two kinds of trip event, one per Kinesis stream."""

    START = "start"
    END = "end"


class Reason(enum.StrEnum):
    """Stable reason codes for invalid events. Alarms and reports key on these values."""

    BODY_TOO_LARGE = "body_too_large"
    BODY_NOT_UTF8 = "body_not_utf8"
    BODY_NOT_JSON = "body_not_json"
    BODY_NOT_OBJECT = "body_not_object"
    NUMBER_NOT_FINITE = "number_not_finite"
    TRIP_ID_MISSING = "trip_id_missing"
    TRIP_ID_EMPTY = "trip_id_empty"
    TRIP_ID_INVALID = "trip_id_invalid"
    TIMESTAMP_MISSING = "timestamp_missing"
    TIMESTAMP_INVALID = "timestamp_invalid"
    WRONG_TYPE = "wrong_type"
    NUMBER_INVALID = "number_invalid"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"
    MONEY_NEGATIVE = "money_negative"
    VALUE_NEGATIVE = "value_negative"
    COORDINATE_OUT_OF_RANGE = "coordinate_out_of_range"
    TEXT_TOO_LONG = "text_too_long"
    VERSION_INVALID = "version_invalid"
    EVENT_KIND_UNKNOWN = "event_kind_unknown"
    TEXT_INVALID = "text_invalid"
    EVENT_UNPARSEABLE = "event_unparseable"


class _FieldType(enum.Enum):
    TEXT = "text"
    TIMESTAMP = "timestamp"
    MONEY = "money"
    COUNT = "count"
    MEASURE = "measure"
    LATITUDE = "latitude"
    LONGITUDE = "longitude"


_START_SCHEMA: dict[str, _FieldType] = {
    "start_time_local": _FieldType.TIMESTAMP,
    "vehicle_placard_number": _FieldType.TEXT,
    "driver_id": _FieldType.TEXT,
    "pickup_location_latitude": _FieldType.LATITUDE,
    "pickup_location_longitude": _FieldType.LONGITUDE,
    "dropoff_location_latitude": _FieldType.LATITUDE,
    "dropoff_location_longitude": _FieldType.LONGITUDE,
    "hail_type": _FieldType.TEXT,
    "upfront_pricing": _FieldType.MONEY,
}

_END_SCHEMA: dict[str, _FieldType] = {
    "end_time_local": _FieldType.TIMESTAMP,
    "fare_type": _FieldType.TEXT,
    "meter_fare_amount": _FieldType.MONEY,
    "promo_rate": _FieldType.MEASURE,
    "tolls": _FieldType.MONEY,
    "sf_exit_fee": _FieldType.MONEY,
    "other_fees": _FieldType.MONEY,
    "tip": _FieldType.MONEY,
    "extra_amount": _FieldType.MONEY,
    "total_fare_amount": _FieldType.MONEY,
    "fare_time_milliseconds": _FieldType.COUNT,
    "trip_distance_meters": _FieldType.MEASURE,
    "qa_flags": _FieldType.TEXT,
    "paratransit": _FieldType.MEASURE,
}

SCHEMAS: dict[EventKind, dict[str, _FieldType]] = {
    EventKind.START: _START_SCHEMA,
    EventKind.END: _END_SCHEMA,
}
REQUIRED_TIMESTAMP = {EventKind.START: "start_time_local", EventKind.END: "end_time_local"}
# The attribute that stores the revision of the last applied event of a kind.
REVISION_ATTRIBUTE = {EventKind.START: "start_revision", EventKind.END: "end_revision"}


@dataclass(frozen=True)
class TripEvent:
    """A validated trip event, ready to be written.

    ``attributes`` maps every schema field of the event's kind to its
    normalised value, or to ``None`` where the event has no value (the write
    then removes that attribute). ``revision`` orders events of one trip and
    kind: a higher revision replaces a lower one, see ``revision_of``.
    """

    kind: EventKind
    trip_id: str
    attributes: dict[str, Any]
    version: int
    digest: str
    ignored_fields: tuple[str, ...] = ()

    @property
    def revision(self) -> str:
        """Return the sortable revision string ``<version, 20 digits>:<sha-256 digest>``."""
        return revision_of(self.version, self.digest)

    def sort_key(self) -> tuple[int, str]:
        """Return the natural order of events of one trip and kind."""
        return (self.version, self.digest)


def revision_of(version: int, digest: str) -> str:
    """Combine a source version and a content digest into one sortable string.

    Zero-padding makes string order equal numeric order, so DynamoDB can
    compare revisions in a condition expression. The digest breaks ties
    between different events that carry the same version, so the winner does
    not depend on arrival order.
    """
    return f"{version:020d}:{digest}"


def decode_body(body: bytes | str, max_bytes: int = MAX_EVENT_BYTES) -> dict[str, Any]:
    """Decode a raw body of at most ``max_bytes`` into a JSON object with exact decimals.

    Raises ``InvalidEventError`` for an oversized, non-UTF-8, non-JSON or
    non-object body, and for ``NaN`` or ``Infinity`` anywhere in it.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    if len(raw) > max_bytes:
        raise InvalidEventError(
            Reason.BODY_TOO_LARGE.value,
            f"body is {len(raw)} bytes, the maximum is {max_bytes}",
        )

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEventError(
            Reason.BODY_NOT_UTF8.value, f"body is not valid UTF-8 at byte {exc.start}"
        ) from exc

    try:
        value = json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)
    except _NonFiniteNumber as exc:
        raise InvalidEventError(
            Reason.NUMBER_NOT_FINITE.value, f"body contains the non-finite number {exc.args[0]}"
        ) from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidEventError(Reason.BODY_NOT_JSON.value, f"body is not valid JSON: {exc}") from exc

    if not isinstance(value, dict):
        raise InvalidEventError(
            Reason.BODY_NOT_OBJECT.value,
            f"body is a JSON {type(value).__name__}, expected an object",
        )
    return value


class _NonFiniteNumber(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NonFiniteNumber(name)


def infer_kind(record: Mapping[str, Any]) -> EventKind:
    """Tell a start event from an end event by its required timestamp field."""
    has_start = record.get("start_time_local") not in (None, "")
    has_end = record.get("end_time_local") not in (None, "")
    if has_start and not has_end:
        return EventKind.START
    if has_end and not has_start:
        return EventKind.END
    raise InvalidEventError(
        Reason.EVENT_KIND_UNKNOWN.value,
        "cannot tell the event kind: expected exactly one of start_time_local and end_time_local",
        trip_id=_trip_id_or_none(record),
    )


def parse_event(body: bytes | str | Mapping[str, Any], kind: EventKind | str | None) -> TripEvent:
    """Parse and validate one event of the given kind (inferred when ``None``).

    ``body`` is raw bytes or text (a stream record, a queue message) or an
    already decoded mapping (a row of a backfill file, where floats are
    accepted and converted exactly through their shortest repr).
    """
    record = body if isinstance(body, Mapping) else decode_body(body)
    event_kind = infer_kind(record) if kind is None else EventKind(kind)
    try:
        return validate_record(record, event_kind)
    except InvalidEventError:
        raise
    except (ArithmeticError, ValueError, UnicodeError, RecursionError, TypeError) as exc:
        # Every known bad value has its own reason code; this keeps one the
        # checks do not foresee from failing a whole batch or wave.
        raise InvalidEventError(
            Reason.EVENT_UNPARSEABLE.value,
            f"validation failed with {type(exc).__name__}: {exc}",
            trip_id=_trip_id_or_none(record),
        ) from exc


def validate_record(record: Mapping[str, Any], kind: EventKind) -> TripEvent:
    """Validate a decoded record and normalise its fields, collecting every problem."""
    problems: list[tuple[str, str | None, str]] = []
    trip_id = _validate_trip_id(record, problems)

    schema = SCHEMAS[kind]
    attributes: dict[str, Any] = {}
    for field, field_type in schema.items():
        try:
            attributes[field] = _normalise(field_type, record.get(field))
        except _FieldProblem as problem:
            problems.append((problem.reason.value, field, problem.detail))

    required = REQUIRED_TIMESTAMP[kind]
    if attributes.get(required) is None and not any(field == required for _, field, _ in problems):
        problems.append((Reason.TIMESTAMP_MISSING.value, required, f"{required} is required"))

    version = _validate_version(record.get(VERSION_FIELD), problems)

    if problems:
        reason, field, detail = problems[0]
        summary = "; ".join(f"{f or 'body'}: {d}" for _, f, d in problems)
        raise InvalidEventError(reason, summary, trip_id=trip_id, problems=tuple(problems))

    # A null field outside the schema carries nothing, so only fields with a
    # value count as ignored (a merged backfill schema has many null ones).
    known = {"trip_id", VERSION_FIELD, *schema}
    ignored = tuple(sorted(name for name, value in record.items() if name not in known and value is not None))
    return TripEvent(
        kind=kind,
        trip_id=trip_id,
        attributes=attributes,
        version=version,
        digest=content_digest(kind, trip_id, attributes),
        ignored_fields=ignored,
    )


_NUMBER_TYPES = frozenset(
    {
        _FieldType.MONEY,
        _FieldType.COUNT,
        _FieldType.MEASURE,
        _FieldType.LATITUDE,
        _FieldType.LONGITUDE,
    }
)


def event_to_json(event: TripEvent) -> str:
    """Serialise a validated event losslessly, for passing it between Spark stages."""
    return json.dumps(
        {
            "kind": event.kind.value,
            "trip_id": event.trip_id,
            "attributes": {
                name: None if value is None else str(value) for name, value in event.attributes.items()
            },
            "version": event.version,
            "digest": event.digest,
            "ignored_fields": list(event.ignored_fields),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def event_from_json(text: str) -> TripEvent:
    """Restore an event written by ``event_to_json``; numbers come back as ``Decimal``."""
    document = json.loads(text)
    kind = EventKind(document["kind"])
    schema = SCHEMAS[kind]
    attributes: dict[str, Any] = {}
    for name, value in document["attributes"].items():
        if value is not None and schema[name] in _NUMBER_TYPES:
            value = Decimal(value)
        attributes[name] = value
    return TripEvent(
        kind=kind,
        trip_id=document["trip_id"],
        attributes=attributes,
        version=int(document["version"]),
        digest=document["digest"],
        ignored_fields=tuple(document.get("ignored_fields", ())),
    )


def content_digest(kind: EventKind, trip_id: str, attributes: Mapping[str, Any]) -> str:
    """Return the SHA-256 of the canonical form of a normalised event."""
    canonical = json.dumps(
        {"kind": kind.value, "trip_id": trip_id, "attributes": attributes},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _FieldProblem(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _trip_id_or_none(record: Mapping[str, Any]) -> str | None:
    value = record.get("trip_id")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _validate_trip_id(record: Mapping[str, Any], problems: list) -> str | None:
    if "trip_id" not in record or record["trip_id"] is None:
        problems.append((Reason.TRIP_ID_MISSING.value, "trip_id", "trip_id is required"))
        return None

    value = record["trip_id"]
    if not isinstance(value, str):
        problems.append(
            (
                Reason.WRONG_TYPE.value,
                "trip_id",
                f"trip_id must be a string, got {type(value).__name__}",
            )
        )
        return None

    trip_id = value.strip()
    if not trip_id:
        problems.append((Reason.TRIP_ID_EMPTY.value, "trip_id", "trip_id is empty"))
        return None
    if len(trip_id) > MAX_TRIP_ID_LENGTH or _INVALID_TEXT_CHARACTERS.search(trip_id):
        problems.append(
            (
                Reason.TRIP_ID_INVALID.value,
                "trip_id",
                f"trip_id must be at most {MAX_TRIP_ID_LENGTH} characters, without control characters, "
                "surrogates or noncharacters",
            )
        )
        return None
    return trip_id


def _validate_version(value: Any, problems: list) -> int:
    if value is None:
        return 0
    try:
        version = _to_decimal(value)
    except _FieldProblem as problem:
        problems.append((Reason.VERSION_INVALID.value, VERSION_FIELD, problem.detail))
        return 0
    if version is None:
        return 0
    if not 0 <= version <= MAX_VERSION or version != version.to_integral_value():
        problems.append(
            (
                Reason.VERSION_INVALID.value,
                VERSION_FIELD,
                f"{VERSION_FIELD} must be a whole number from 0 to {MAX_VERSION}, got {value!r}",
            )
        )
        return 0
    return int(version)


def _normalise(field_type: _FieldType, value: Any) -> Any:
    if value is None:
        return None
    return _NORMALISERS[field_type](value)


def _normalise_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise _FieldProblem(Reason.WRONG_TYPE, f"expected text, got {type(value).__name__}")
    text = str(value).strip()
    if not text or text in MISSING_VALUE_PLACEHOLDERS:
        return None
    if len(text) > MAX_TEXT_LENGTH:
        raise _FieldProblem(Reason.TEXT_TOO_LONG, f"text is longer than {MAX_TEXT_LENGTH} characters")
    if _INVALID_TEXT_CHARACTERS.search(text):
        raise _FieldProblem(
            Reason.TEXT_INVALID, "text contains control characters, surrogates or noncharacters"
        )
    return text


def _normalise_timestamp(value: Any) -> str | None:
    if not isinstance(value, str):
        raise _FieldProblem(Reason.WRONG_TYPE, f"expected a timestamp string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    return parse_timestamp(text).isoformat()


def parse_timestamp(text: str) -> datetime:
    """Parse a portal or ISO-8601 timestamp into San Francisco time.

    A timestamp without a zone is read as San Francisco local time. In the
    repeated hour when daylight saving time ends, such a timestamp is
    ambiguous and the earlier instant is taken (``fold=0``); in the skipped
    hour when it starts, it is moved forward by an hour.
    """
    for parse in (_parse_portal, datetime.fromisoformat):
        try:
            moment = parse(text)
        except ValueError:
            continue
        try:
            if moment.tzinfo is None:
                # The round trip through UTC moves a local time in the
                # spring-forward gap (02:30 on the day clocks jump to 03:00)
                # to the instant it names, 03:30 daylight time.
                moment = moment.replace(tzinfo=SAN_FRANCISCO).astimezone(UTC)
            return moment.astimezone(SAN_FRANCISCO)
        except OverflowError as exc:
            raise _FieldProblem(
                Reason.TIMESTAMP_INVALID, f"{text!r} is outside the years 1 to 9999 in San Francisco time"
            ) from exc
    raise _FieldProblem(
        Reason.TIMESTAMP_INVALID,
        f"{text!r} is neither 'YYYY/MM/DD hh:mm:ss AM' nor ISO-8601",
    )


def _parse_portal(text: str) -> datetime:
    return datetime.strptime(text, _PORTAL_TIMESTAMP)


def _to_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        raise _FieldProblem(Reason.WRONG_TYPE, "expected a number, got bool")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _FieldProblem(Reason.NUMBER_NOT_FINITE, f"{value!r} is not a finite number")
        number = Decimal(repr(value))
    elif isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if not _NUMBER_TEXT.match(text):
            raise _FieldProblem(Reason.NUMBER_INVALID, f"{value!r} is not a number")
        try:
            number = Decimal(text.replace(",", ""))
        except ArithmeticError as exc:
            raise _FieldProblem(
                Reason.NUMBER_OUT_OF_RANGE, f"{value!r} does not fit a DynamoDB number"
            ) from exc
    else:
        raise _FieldProblem(Reason.WRONG_TYPE, f"expected a number, got {type(value).__name__}")

    if not number.is_finite():
        raise _FieldProblem(Reason.NUMBER_NOT_FINITE, f"{value!r} is not a finite number")
    if not number:
        return Decimal(0)  # also turns -0 and 0E-5 into plain 0
    if not _MIN_EXPONENT <= number.adjusted() <= _MAX_EXPONENT or not _fits_38_digits(number):
        raise _FieldProblem(
            Reason.NUMBER_OUT_OF_RANGE,
            f"{value!r} needs more than 38 significant digits or is out of DynamoDB's range",
        )
    # normalize() drops trailing zeros, so 30.40 is stored as 30.4.
    return number.normalize(_DYNAMODB_CONTEXT)


def _fits_38_digits(number: Decimal) -> bool:
    try:
        return _DYNAMODB_CONTEXT.create_decimal(number) == number
    except ArithmeticError:
        return False


def _normalise_non_negative(reason: Reason) -> Callable[[Any], Decimal | None]:
    def normalise(value: Any) -> Decimal | None:
        number = _to_decimal(value)
        if number is not None and number < 0:
            raise _FieldProblem(reason, f"{number} is negative")
        return number

    return normalise


def _normalise_count(value: Any) -> Decimal | None:
    number = _normalise_non_negative(Reason.VALUE_NEGATIVE)(value)
    if number is not None and number != number.to_integral_value():
        raise _FieldProblem(Reason.NUMBER_INVALID, f"{number} is not a whole number")
    return number


def _normalise_coordinate(limit: int) -> Callable[[Any], Decimal | None]:
    def normalise(value: Any) -> Decimal | None:
        number = _to_decimal(value)
        if number is not None and not -limit <= number <= limit:
            raise _FieldProblem(Reason.COORDINATE_OUT_OF_RANGE, f"{number} is outside [-{limit}, {limit}]")
        return number

    return normalise


_NORMALISERS: dict[_FieldType, Callable[[Any], Any]] = {
    _FieldType.TEXT: _normalise_text,
    _FieldType.TIMESTAMP: _normalise_timestamp,
    _FieldType.MONEY: _normalise_non_negative(Reason.MONEY_NEGATIVE),
    _FieldType.COUNT: _normalise_count,
    _FieldType.MEASURE: _normalise_non_negative(Reason.VALUE_NEGATIVE),
    _FieldType.LATITUDE: _normalise_coordinate(90),
    _FieldType.LONGITUDE: _normalise_coordinate(180),
}
