"""A fault-injecting HTTP proxy in front of the local AWS endpoint, for the demo.

The proxy listens on 127.0.0.1 and forwards every request to the local
endpoint unchanged, except that it fails a configurable share of DynamoDB
``UpdateItem`` calls (trip writes) with a retryable error. Point the stream
functions at it through ``AWS_ENDPOINT_URL`` and their trip writes fail the
way a throttled or unhealthy DynamoDB fails them.

The choice is deterministic per event: a SHA-256 of the trip id and the event
kind decides whether every write of that event fails. The SDK's own retries
of a failed write therefore fail as well, and the event really reaches the
retry queue. The kind is read from the request's ``ExpressionAttributeNames``,
which name ``start_revision`` or ``end_revision``.

This is demo tooling: it never runs in the product's code path.
"""

from __future__ import annotations

import enum
import hashlib
import http.client
import json
import logging
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_FAILURE_RATE = 0.2
UPDATE_ITEM_TARGET = "DynamoDB_20120810.UpdateItem"
REVISION_ATTRIBUTE_KINDS = {"start_revision": "start", "end_revision": "end"}

# Bounds that keep a misbehaving client from exhausting the demo machine.
# The largest request the pipeline sends is a Kinesis PutRecords call (at
# most 5 MiB of records plus JSON and base64 overhead) or a CloudFormation
# template, so 16 MiB leaves room for both.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_CONCURRENT_REQUESTS = 64
UPSTREAM_TIMEOUT_SECONDS = 60.0
IDLE_CONNECTION_TIMEOUT_SECONDS = 120.0

# Headers that describe one connection, not the request, so they are not forwarded.
_HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# http.server writes its own Server and Date headers on every response.
_RESPONSE_HEADERS_SET_BY_SERVER = frozenset({"server", "date"})


class FaultKind(enum.StrEnum):
    """The retryable error returned for a failed trip write."""

    INTERNAL_SERVER_ERROR = "internal-server-error"
    THROTTLING = "throttling"


_FAULT_RESPONSES: dict[FaultKind, tuple[int, str]] = {
    FaultKind.INTERNAL_SERVER_ERROR: (500, "com.amazonaws.dynamodb.v20120810#InternalServerError"),
    FaultKind.THROTTLING: (
        400,
        "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
    ),
}


class FaultProxyError(RuntimeError):
    """The fault proxy could not be started or used."""


def validate_failure_rate(rate: float) -> float:
    """Return ``rate`` as a float, or raise ``ValueError`` unless it is in [0, 1]."""
    value = float(rate)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"failure rate {rate!r} is invalid: use a share from 0 to 1, such as 0.2")
    return value


def event_fails(trip_id: str, kind: str, failure_rate: float, salt: str = "") -> bool:
    """Decide whether every write of the event ``(trip_id, kind)`` fails.

    The SHA-256 of salt, kind and trip id is read as a number in [0, 1), so
    each event has the same chance and the same event always gets the same
    result. A different ``salt`` picks a different set of events.
    """
    digest = hashlib.sha256(f"{salt}\x1f{kind}\x1f{trip_id}".encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return share < failure_rate


def describe_trip_write(body: bytes) -> tuple[str, str] | None:
    """Return ``(trip_id, kind)`` of an ``UpdateItem`` request body, or ``None`` for other writes.

    A request counts as a trip write when its key has a string ``trip_id``
    and its ``ExpressionAttributeNames`` name exactly one of the revision
    attributes ``start_revision`` and ``end_revision``.
    """
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None

    trip_id = (request.get("Key") or {}).get("trip_id", {})
    trip_id = trip_id.get("S") if isinstance(trip_id, dict) else None
    names = request.get("ExpressionAttributeNames") or {}
    if not isinstance(trip_id, str) or not isinstance(names, dict):
        return None

    kinds = {REVISION_ATTRIBUTE_KINDS[name] for name in names.values() if name in REVISION_ATTRIBUTE_KINDS}
    if len(kinds) != 1:
        return None
    return trip_id, kinds.pop()


@dataclass(frozen=True)
class FaultStats:
    """Counts kept by the proxy since it started, or since the last ``reset_stats``.

    ``update_item_outcomes`` counts the forwarded ``UpdateItem`` responses by
    outcome: ``ok`` for a 200, else the short error type such as
    ``ConditionalCheckFailedException``.
    """

    requests: int = 0
    update_item_requests: int = 0
    faults_injected: int = 0
    faulted_events: frozenset[tuple[str, str]] = frozenset()
    update_item_outcomes: dict[str, int] = field(default_factory=dict)
    upstream_errors: int = 0
    rejected_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the counts as plain JSON-ready values."""
        return {
            "requests": self.requests,
            "update_item_requests": self.update_item_requests,
            "faults_injected": self.faults_injected,
            "faulted_events": len(self.faulted_events),
            "update_item_outcomes": dict(self.update_item_outcomes),
            "upstream_errors": self.upstream_errors,
            "rejected_requests": self.rejected_requests,
        }


class _Counters:
    """Mutable, lock-protected counters behind ``FaultStats``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.update_item_requests = 0
        self.faults_injected = 0
        self.faulted_events: set[tuple[str, str]] = set()
        self.update_item_outcomes: Counter[str] = Counter()
        self.upstream_errors = 0
        self.rejected_requests = 0

    def snapshot(self) -> FaultStats:
        return FaultStats(
            requests=self.requests,
            update_item_requests=self.update_item_requests,
            faults_injected=self.faults_injected,
            faulted_events=frozenset(self.faulted_events),
            update_item_outcomes=dict(self.update_item_outcomes),
            upstream_errors=self.upstream_errors,
            rejected_requests=self.rejected_requests,
        )


class FaultInjectingProxy:
    """An HTTP proxy on 127.0.0.1 that fails a share of trip writes; usable as a context manager.

    Parameters
    ----------
    upstream_url:
        The local endpoint to forward to, such as ``http://127.0.0.1:4566``.
        It may be set later through ``upstream_url``; until then every
        request gets a 503.
    failure_rate:
        Share of events, from 0 to 1, whose writes all fail.
    fault_kind:
        The error returned for a failed write.
    salt:
        Text mixed into the choice of events, so that another salt fails
        other events at the same rate.
    port:
        TCP port on 127.0.0.1; a free one is picked when 0.

    Examples
    --------
    >>> proxy = FaultInjectingProxy("http://127.0.0.1:4566", failure_rate=0.2)
    >>> with proxy:  # doctest: +SKIP
    ...     env = {"AWS_ENDPOINT_URL": proxy.url}
    """

    def __init__(
        self,
        upstream_url: str | None = None,
        failure_rate: float = DEFAULT_FAILURE_RATE,
        fault_kind: FaultKind = FaultKind.INTERNAL_SERVER_ERROR,
        salt: str = "",
        port: int = 0,
    ) -> None:
        self._failure_rate = validate_failure_rate(failure_rate)
        self._fault_kind = FaultKind(fault_kind)
        self._salt = salt
        self._requested_port = port
        self._upstream: tuple[str, int] | None = None
        self._upstream_url: str | None = None
        self._enabled = True
        self._counters = _Counters()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if upstream_url:
            self.upstream_url = upstream_url

    @property
    def upstream_url(self) -> str | None:
        """The endpoint that requests are forwarded to."""
        return self._upstream_url

    @upstream_url.setter
    def upstream_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"upstream URL {url!r} is invalid: use http://HOST:PORT")
        self._upstream = (parts.hostname, parts.port or 80)
        self._upstream_url = url.rstrip("/")

    @property
    def url(self) -> str:
        """The proxy's own URL, for ``AWS_ENDPOINT_URL`` or a client's ``endpoint_url``."""
        if self._server is None:
            raise FaultProxyError("the fault proxy has not been started")
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def failure_rate(self) -> float:
        """Share of events whose writes fail while faults are on."""
        return self._failure_rate

    @property
    def enabled(self) -> bool:
        """Whether faults are injected; when off, every request passes through."""
        return self._enabled

    def enable(self) -> None:
        """Turn fault injection on."""
        self._enabled = True
        logger.info("fault injection on (failure rate %.2f)", self._failure_rate)

    def disable(self) -> None:
        """Turn fault injection off; the proxy keeps forwarding every request."""
        self._enabled = False
        logger.info("fault injection off")

    def fails(self, trip_id: str, kind: str) -> bool:
        """Tell whether the writes of event ``(trip_id, kind)`` fail while faults are on."""
        return event_fails(trip_id, kind, self._failure_rate, self._salt)

    def stats(self) -> FaultStats:
        """Return a snapshot of the counts."""
        with self._counters.lock:
            return self._counters.snapshot()

    def reset_stats(self) -> None:
        """Set every count back to zero."""
        with self._counters.lock:
            self._counters.reset()

    def start(self) -> FaultInjectingProxy:
        """Start serving on 127.0.0.1 in a background thread."""
        if self._server is not None:
            raise FaultProxyError(f"the fault proxy is already running at {self.url}")
        handler = type("FaultProxyHandler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer((HOST, self._requested_port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        logger.info(
            "fault proxy started at %s, forwarding to %s (failure rate %.2f, %s)",
            self.url,
            self._upstream_url or "(not set yet)",
            self._failure_rate,
            self._fault_kind.value,
        )
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Does nothing when not running."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        logger.info("fault proxy stopped; %s", self.stats().to_dict())

    def __enter__(self) -> FaultInjectingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _decide(self, target: str, body: bytes) -> tuple[str, str] | None:
        """Count a request and return the event key when its response must be a fault."""
        write = describe_trip_write(body) if target == UPDATE_ITEM_TARGET else None
        inject = write is not None and self._enabled and self.fails(*write)
        with self._counters.lock:
            self._counters.requests += 1
            if target == UPDATE_ITEM_TARGET:
                self._counters.update_item_requests += 1
            if inject:
                self._counters.faults_injected += 1
                self._counters.faulted_events.add(write)
        return write if inject else None

    def _record_update_outcome(self, status: int, body: bytes) -> None:
        outcome = "ok" if status == 200 else _error_type(body) or f"http_{status}"
        with self._counters.lock:
            self._counters.update_item_outcomes[outcome] += 1

    def _record_upstream_error(self) -> None:
        with self._counters.lock:
            self._counters.upstream_errors += 1

    def _record_rejection(self) -> None:
        with self._counters.lock:
            self._counters.rejected_requests += 1

    def _fault_response(self) -> tuple[int, bytes, str]:
        status, error_type = _FAULT_RESPONSES[self._fault_kind]
        body = json.dumps({"__type": error_type, "message": "injected fault"}).encode()
        return status, body, error_type.rsplit("#", 1)[-1]


def _error_type(body: bytes) -> str | None:
    """Return the short ``__type`` of a DynamoDB error body, such as ``ValidationException``."""
    try:
        error_type = json.loads(body).get("__type", "")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return error_type.rsplit("#", 1)[-1] or None


class _RequestTooLarge(Exception):
    pass


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forward one request to the upstream endpoint, or respond with an injected fault."""

    proxy: FaultInjectingProxy
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_SECONDS

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._handle()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("%s - %s", self.address_string(), format % args)

    def _handle(self) -> None:
        proxy = self.proxy
        if not proxy._slots.acquire(timeout=UPSTREAM_TIMEOUT_SECONDS):
            proxy._record_rejection()
            self._send(503, b'{"message":"fault proxy is busy"}', {"Content-Type": "application/json"})
            return
        try:
            self._forward_or_fail()
        finally:
            proxy._slots.release()

    def _forward_or_fail(self) -> None:
        proxy = self.proxy
        try:
            body = self._read_body()
        except _RequestTooLarge:
            proxy._record_rejection()
            self.close_connection = True
            self._send(413, b'{"message":"request body too large for the fault proxy"}', {})
            return

        target = self.headers.get("X-Amz-Target", "")
        faulted = proxy._decide(target, body)
        if faulted is not None:
            status, fault_body, error_type = proxy._fault_response()
            logger.debug("injected %s for trip %s (%s event)", error_type, *faulted)
            self._send(
                status,
                fault_body,
                {
                    "Content-Type": "application/x-amz-json-1.0",
                    "x-amzn-RequestId": str(uuid.uuid4()),
                    "x-amzn-ErrorType": error_type,
                },
            )
            return

        if proxy._upstream is None:
            self._send(503, b'{"message":"fault proxy has no upstream endpoint yet"}', {})
            return

        try:
            status, headers, response_body = self._forward(body)
        except (OSError, http.client.HTTPException) as exc:
            proxy._record_upstream_error()
            logger.warning(
                "forwarding %s %s to %s failed: %s",
                self.command,
                self.path,
                proxy.upstream_url,
                exc,
            )
            message = json.dumps({"message": f"upstream endpoint failed: {exc}"}).encode()
            self._send(502, message, {})
            return

        if target == UPDATE_ITEM_TARGET:
            proxy._record_update_outcome(status, response_body)
        self._send(status, response_body, headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _RequestTooLarge()
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked_body(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Skip optional trailers up to the blank line that ends the body.
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise _RequestTooLarge()
            chunks.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        host, port = self.proxy._upstream
        headers = {
            name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP_HEADERS
        }
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_SECONDS)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            response_body = response.read(MAX_BODY_BYTES + 1)
            if len(response_body) > MAX_BODY_BYTES:
                raise http.client.HTTPException(f"response body larger than {MAX_BODY_BYTES} bytes")
            response_headers = {
                name: value
                for name, value in response.getheaders()
                if name.lower() not in _HOP_BY_HOP_HEADERS | _RESPONSE_HEADERS_SET_BY_SERVER
            }
            # A response to HEAD has no body but states the length of the resource.
            if self.command == "HEAD" and response.getheader("Content-Length"):
                response_headers["Content-Length"] = response.getheader("Content-Length")
            return response.status, response_headers, response_body
        finally:
            connection.close()

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
