"""A small Freshet client on top of the stubs generated from proto/.

What it shows:

- one channel per process, reused by every call and thread (a channel is a
  pool of HTTP/2 connections; creating one per request costs a TCP and maybe
  a TLS handshake each time);
- retries with exponential backoff for UNAVAILABLE and RESOURCE_EXHAUSTED,
  done by gRPC itself from the channel's service config (``retryPolicy``),
  with ``retryThrottling`` so a struggling server is not hammered;
- a deadline on every call (it covers all retry attempts together);
- the bearer token sent as ``authorization: Bearer <token>`` on every call:
  as call credentials over TLS, or by an interceptor on a plaintext channel
  (gRPC refuses call credentials on insecure channels, so that a token is
  never sent in clear by accident: do it only inside a trusted network);
- statuses and event times read from every value, never just the value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence

import grpc

# The generated code lives in ../gen (made by client-examples/setup.sh, not
# committed); its modules import each other as "freshet.v1....", so that
# directory must be on the import path.
_GEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gen")
if _GEN not in sys.path:
    sys.path.insert(0, _GEN)

try:
    from freshet.v1 import feature_service_pb2 as pb
    from freshet.v1 import feature_service_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a setup problem, not a bug
    raise ImportError(f"generated code not found in {_GEN}: run client-examples/setup.sh first ({e})") from e

SERVICE = "freshet.v1.FeatureService"

# gRPC's service config (https://github.com/grpc/grpc/blob/master/doc/service_config.md).
# - retryPolicy: up to 4 attempts, backoff 50 ms, 100 ms, 200 ms (randomized
#   by gRPC between 0 and the value), for UNAVAILABLE (server down, restarting,
#   connection lost) and RESOURCE_EXHAUSTED (Freshet sheds calls over its
#   in-flight limit at once: a short wait usually gets through). Other codes
#   are final: INVALID_ARGUMENT is a bug in the request, DEADLINE_EXCEEDED
#   means the time budget is gone, UNAUTHENTICATED needs another token.
# - retryThrottling: every failure costs a token, every success gives back
#   0.1; below half of maxTokens, retries stop, so a fleet of clients does not
#   multiply the load of a server that is already shedding.
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

CHANNEL_OPTIONS = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # Keep the connection warm and notice a dead peer between requests.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]

STATUS_NAMES = {v: k for k, v in pb.FeatureStatus.items()}
VERDICT_NAMES = {v: k for k, v in pb.FreshnessVerdict.items()}
# Verdicts under which a view's values are good enough to act on: caught up,
# or behind with the newest applied event still within the view's budget.
TRUSTED_VERDICTS = frozenset({"FRESH", "LAGGING"})


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (plaintext channels)."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        metadata = list(details.metadata or []) + [self._metadata]
        details = _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression)
        return continuation(details, request)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def make_channel(address: str, token: str | None = None, tls_ca: str | None = None) -> grpc.Channel:
    """The one channel of the process. ``tls_ca``: PEM file of the CA that
    signed the server's certificate (TLS); without it, plaintext."""
    if tls_ca is not None:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


@dataclasses.dataclass
class Feature:
    """One value of one entity, with what the server says about it."""

    status: str  # PRESENT, NULL_VALUE, NOT_FOUND or OUTSIDE_MAX_AGE
    value: object  # int, float, str, bool, datetime (UTC), or None
    event_time: dt.datetime | None  # newest event the value reflects

    @property
    def present(self) -> bool:
        return self.status == "PRESENT"


def _timestamp(ts) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=dt.UTC)


def _value(v: pb.Value) -> object:
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "timestamp_value":
        return _timestamp(v.timestamp_value)
    return getattr(v, kind)


def decode(response: pb.GetFeaturesResponse) -> list[dict[str, Feature]]:
    """Rows of a GetFeaturesResponse as {feature reference: Feature}, in
    request order."""
    rows = []
    for row in response.results:
        features = {}
        for name, fv in zip(response.feature_names, row.values):
            features[name] = Feature(
                status=STATUS_NAMES.get(fv.status, str(fv.status)),
                value=_value(fv.value) if fv.HasField("value") else None,
                event_time=_timestamp(fv.event_time) if fv.HasField("event_time") else None,
            )
        rows.append(features)
    return rows


@dataclasses.dataclass
class ViewFreshness:
    view: str
    verdict: str
    age_ms: int
    budget_ms: int

    @property
    def trusted(self) -> bool:
        return self.verdict in TRUSTED_VERDICTS


class FreshetClient:
    """Thread-safe; make one per process and share it."""

    def __init__(
        self, address: str, token: str | None = None, tls_ca: str | None = None, deadline_s: float = 0.5, freshness_ttl_s: float = 5.0
    ):
        self.channel = make_channel(address, token, tls_ca)
        self.stub = pb_grpc.FeatureServiceStub(self.channel)
        self.deadline_s = deadline_s
        self._freshness_ttl_s = freshness_ttl_s
        self._freshness: dict[str, ViewFreshness] = {}
        self._freshness_at = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def list_views(self) -> pb.ListFeatureViewsResponse:
        return self.stub.ListFeatureViews(pb.ListFeatureViewsRequest(), timeout=self.deadline_s)

    def get_features(self, features: Sequence[str], user_ids: Iterable[int], max_age_s: float | None = None) -> pb.GetFeaturesResponse:
        """One batched call for all entities (the server takes up to 1000 per
        call by default: chunk larger batches)."""
        request = pb.GetFeaturesRequest(
            features=list(features),
            entities=[pb.EntityKey(int64_key=int(u)) for u in user_ids],
        )
        if max_age_s is not None:
            request.max_age.FromNanoseconds(int(max_age_s * 1e9))
        # timeout= is the deadline, sent to the server as grpc-timeout; the
        # server stops working on the call when it passes.
        return self.stub.GetFeatures(request, timeout=self.deadline_s)

    def freshness(self, force: bool = False) -> dict[str, ViewFreshness]:
        """Verdict per view, cached for freshness_ttl_s: one GetFreshness
        every few seconds is plenty, it is not for the hot path."""
        with self._lock:
            if force or time.monotonic() - self._freshness_at > self._freshness_ttl_s:
                answer = self.stub.GetFreshness(pb.GetFreshnessRequest(), timeout=self.deadline_s)
                self._freshness = {
                    v.view: ViewFreshness(
                        view=v.view,
                        verdict=VERDICT_NAMES.get(v.verdict, str(v.verdict)),
                        age_ms=v.age.ToMilliseconds(),
                        budget_ms=v.budget.ToMilliseconds(),
                    )
                    for v in answer.views
                }
                self._freshness_at = time.monotonic()
            return dict(self._freshness)
