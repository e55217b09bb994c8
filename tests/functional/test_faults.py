"""The fault-injecting proxy in front of a stand-in endpoint on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from taxi_pipeline.tooling.faults import (
    UPDATE_ITEM_TARGET,
    FaultInjectingProxy,
    FaultKind,
    describe_trip_write,
    event_fails,
)

JSON_CONTENT_TYPE = "application/x-amz-json-1.0"
CONDITION_FAILED_TRIP = "trip-condition-failed"


@dataclass
class StandInEndpoint:
    """An HTTP server that records every request and responds as DynamoDB does."""

    url: str = ""
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _stand_in_handler(endpoint: StandInEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with endpoint.lock:
                endpoint.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
            status, answer = 200, b"{}"
            if CONDITION_FAILED_TRIP.encode() in body:
                status = 400
                answer = json.dumps(
                    {"__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"}
                ).encode()
            self.send_response(status)
            self.send_header("Content-Type", JSON_CONTENT_TYPE)
            self.send_header("X-Stand-In", "yes")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_PUT = do_DELETE = do_POST  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture
def upstream() -> Iterator[StandInEndpoint]:
    endpoint = StandInEndpoint()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _stand_in_handler(endpoint))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.fixture
def make_proxy(upstream) -> Iterator:
    proxies: list[FaultInjectingProxy] = []

    def make(**options) -> FaultInjectingProxy:
        proxy = FaultInjectingProxy(upstream.url, **options).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def update_item_body(trip_id: str, kind: str) -> bytes:
    """Return an UpdateItem request body shaped like a trip write of ``kind``."""
    return json.dumps(
        {
            "TableName": "taxi_trip_details",
            "Key": {"trip_id": {"S": trip_id}},
            "UpdateExpression": "SET #a0 = :a0, #rev = :rev",
            "ExpressionAttributeNames": {
                "#a0": "tip",
                "#rev": f"{kind}_revision",
                "#status": "trip_status",
            },
            "ExpressionAttributeValues": {":a0": {"N": "1"}, ":rev": {"S": "0:x"}},
        }
    ).encode()


def post(url: str, body: bytes, target: str = UPDATE_ITEM_TARGET, path: str = "/") -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={"X-Amz-Target": target, "Content-Type": JSON_CONTENT_TYPE},
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_injected_share_matches_rate(make_proxy, upstream):
    proxy = make_proxy(failure_rate=0.2)
    events = [(f"trip-{number}", kind) for number in range(500) for kind in ("start", "end")]

    statuses = [post(proxy.url, update_item_body(trip_id, kind))[0] for trip_id, kind in events]

    failed = statuses.count(500)
    assert 0.15 <= failed / len(events) <= 0.25
    assert statuses.count(200) == len(events) - failed
    assert proxy.stats().faults_injected == failed
    assert len(upstream.requests) == len(events) - failed


def test_same_event_always_fails_the_same_way(make_proxy, upstream):
    proxy = make_proxy(failure_rate=0.3, salt="seed-1")
    events = [(f"trip-{number}", kind) for number in range(60) for kind in ("start", "end")]

    rounds = [
        {event for event in events if post(proxy.url, update_item_body(*event))[0] == 500} for _ in range(3)
    ]

    assert rounds[0] == rounds[1] == rounds[2]
    assert rounds[0] == {event for event in events if proxy.fails(*event)}
    assert proxy.stats().faulted_events == frozenset(rounds[0])
    forwarded_trips = {json.loads(request["body"])["Key"]["trip_id"]["S"] for request in upstream.requests}
    assert all(trip_id in forwarded_trips for trip_id, _ in set(events) - rounds[0])


def test_choice_depends_on_kind_and_salt():
    trips = [f"trip-{number}" for number in range(400)]

    starts = {trip for trip in trips if event_fails(trip, "start", 0.5)}
    ends = {trip for trip in trips if event_fails(trip, "end", 0.5)}
    salted = {trip for trip in trips if event_fails(trip, "start", 0.5, salt="other")}

    assert starts != ends
    assert starts != salted
    assert not any(event_fails(trip, "start", 0.0) for trip in trips)
    assert all(event_fails(trip, "start", 1.0) for trip in trips)


def test_fault_response_is_internal_server_error(make_proxy):
    proxy = make_proxy(failure_rate=1.0)

    status, headers, body = post(proxy.url, update_item_body("trip-1", "end"))

    assert status == 500
    assert json.loads(body) == {
        "__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
        "message": "injected fault",
    }
    assert headers["x-amzn-ErrorType"] == "InternalServerError"


def test_throttling_fault_is_400(make_proxy):
    proxy = make_proxy(failure_rate=1.0, fault_kind=FaultKind.THROTTLING)

    status, _, body = post(proxy.url, update_item_body("trip-1", "start"))

    assert status == 400
    assert json.loads(body)["__type"].endswith("#ProvisionedThroughputExceededException")


def test_other_calls_pass_through(make_proxy, upstream):
    proxy = make_proxy(failure_rate=1.0)
    get_item = json.dumps({"TableName": "taxi_trip_details", "Key": {"trip_id": {"S": "trip-1"}}}).encode()
    plain_update = json.dumps({"TableName": "other", "Key": {"trip_id": {"S": "trip-1"}}}).encode()
    calls = [
        ("DynamoDB_20120810.GetItem", get_item, "/"),
        ("DynamoDB_20120810.PutItem", update_item_body("trip-1", "start"), "/"),
        (UPDATE_ITEM_TARGET, plain_update, "/"),
        ("AmazonSQS.SendMessage", b'{"QueueUrl":"q","MessageBody":"x"}', "/000000000000/queue"),
    ]

    responses = [post(proxy.url, body, target, path) for target, body, path in calls]

    assert [status for status, _, _ in responses] == [200, 200, 200, 200]
    assert all(headers.get("X-Stand-In") == "yes" for _, headers, _ in responses)
    assert [(request["path"], request["body"]) for request in upstream.requests] == [
        (path, body) for _, body, path in calls
    ]
    assert upstream.requests[3]["headers"]["X-Amz-Target"] == "AmazonSQS.SendMessage"
    assert proxy.stats().faults_injected == 0
    assert proxy.stats().requests == 4


def test_disabled_proxy_forwards_trip_writes(make_proxy, upstream):
    proxy = make_proxy(failure_rate=1.0)
    proxy.disable()

    status, _, _ = post(proxy.url, update_item_body("trip-1", "end"))

    assert status == 200
    assert len(upstream.requests) == 1
    assert proxy.stats().update_item_outcomes == {"ok": 1}

    proxy.enable()
    assert post(proxy.url, update_item_body("trip-1", "end"))[0] == 500


def test_forwarded_outcomes_are_counted(make_proxy):
    proxy = make_proxy(failure_rate=0.0)

    post(proxy.url, update_item_body("trip-1", "start"))
    post(proxy.url, update_item_body(CONDITION_FAILED_TRIP, "start"))

    assert proxy.stats().update_item_outcomes == {"ok": 1, "ConditionalCheckFailedException": 1}
    proxy.reset_stats()
    assert proxy.stats().requests == 0


def test_sdk_retries_of_a_failing_event_all_fail(make_proxy, upstream):
    proxy = make_proxy(failure_rate=1.0)
    client = boto3.client(
        "dynamodb",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"mode": "standard", "total_max_attempts": 3}),
    )

    with pytest.raises(ClientError) as caught:
        client.update_item(
            TableName="taxi_trip_details",
            Key={"trip_id": {"S": "trip-1"}},
            UpdateExpression="SET #rev = :rev",
            ExpressionAttributeNames={"#rev": "end_revision"},
            ExpressionAttributeValues={":rev": {"S": "0:x"}},
        )

    assert caught.value.response["Error"]["Code"] == "InternalServerError"
    assert proxy.stats().faults_injected == 3
    assert proxy.stats().faulted_events == frozenset({("trip-1", "end")})
    assert upstream.requests == []


def test_unreachable_upstream_gives_502():
    # A port that was free a moment ago has no listener.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = FaultInjectingProxy(f"http://127.0.0.1:{closed_port}", failure_rate=0.0).start()
    try:
        status, _, body = post(proxy.url, b"{}", target="DynamoDB_20120810.GetItem")
    finally:
        proxy.stop()

    assert status == 502
    assert "upstream endpoint failed" in json.loads(body)["message"]
    assert proxy.stats().upstream_errors == 1


def test_trip_write_is_recognised_by_revision_name():
    assert describe_trip_write(update_item_body("trip-9", "start")) == ("trip-9", "start")
    assert describe_trip_write(update_item_body("trip-9", "end")) == ("trip-9", "end")
    assert describe_trip_write(b"not json") is None
    assert describe_trip_write(b'{"Key": {"trip_id": {"S": "trip-9"}}}') is None


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_invalid_failure_rate_is_rejected(rate):
    with pytest.raises(ValueError, match="failure rate"):
        FaultInjectingProxy(failure_rate=rate)
