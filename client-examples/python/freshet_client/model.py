"""A typical model server's use of Freshet: at startup, check that every
feature the model was trained on exists; per prediction, one batched
GetFeatures, a feature vector in the model's fixed order with defaults for
what is missing, untrusted or stale, then predict.

The "model" is a toy logistic score; the point is the plumbing around it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Sequence

from .client import Feature, FreshetClient, ViewFreshness, decode

# The model's inputs, in the order it was trained on. Never derive the order
# from the response: build the vector by name.
FEATURES: list[str] = [
    "user_activity:events_10s",
    "user_activity:events_1m",
    "user_activity:events_1h",
    "user_activity:last_event_type",
    "user_activity:last_event_at",
    "orders:orders_1h",
    "orders:spend_1h",
    "orders:avg_order_1h",
    "orders:max_order_1h",
    "orders:items_1h",
    "orders:last_express",
]

# What the model sees when a value is not usable (NOT_FOUND, NULL_VALUE,
# OUTSIDE_MAX_AGE, or its view is not fresh enough to trust): the values the
# model was trained with for "unknown". Windowed counts of an unknown user
# are 0; an unknown amount is the training mean, not 0.
DEFAULTS: dict[str, float] = {
    "user_activity:events_10s": 0.0,
    "user_activity:events_1m": 0.0,
    "user_activity:events_1h": 0.0,
    "user_activity:last_event_type": 0.0,
    "user_activity:last_event_at": 1e6,  # seconds since the last event: "long ago"
    "orders:orders_1h": 0.0,
    "orders:spend_1h": 0.0,
    "orders:avg_order_1h": 25.0,
    "orders:max_order_1h": 25.0,
    "orders:items_1h": 0.0,
    "orders:last_express": 0.0,
}

# Categorical feature -> number, as at training time.
EVENT_TYPES = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 4.0}

WEIGHTS = [0.08, 0.05, 0.01, 0.3, -1e-6, 0.4, 0.01, 0.005, 0.002, 0.05, 0.2]
BIAS = -2.0


def encode(name: str, feature: Feature, now: dt.datetime) -> float:
    """One model input from one value; the caller has checked it is usable."""
    value = feature.value
    if name == "user_activity:last_event_type":
        return EVENT_TYPES.get(str(value), 0.0)
    if isinstance(value, dt.datetime):
        return max(0.0, (now - value).total_seconds())
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return float(value)


def vector(row: dict[str, Feature], trusted_views: set[str], now: dt.datetime) -> list[float]:
    """The model's input for one entity, in FEATURES order."""
    out = []
    for name in FEATURES:
        f = row.get(name)
        usable = f is not None and f.present and name.split(":", 1)[0] in trusted_views
        out.append(encode(name, f, now) if usable else DEFAULTS[name])
    return out


def predict(v: Sequence[float]) -> float:
    z = BIAS + sum(w * x for w, x in zip(WEIGHTS, v))
    return 1.0 / (1.0 + math.exp(-z))


class Model:
    def __init__(self, client: FreshetClient):
        self.client = client
        self.check_features()

    def check_features(self) -> None:
        """Fail at startup, not at the first request, if the store does not
        declare a feature the model needs (a renamed view, a typo)."""
        declared = {f"{v.name}:{f.name}" for v in self.client.list_views().views for f in v.features}
        missing = [f for f in FEATURES if f not in declared]
        if missing:
            raise RuntimeError(f"features unknown to the feature store: {missing}")

    def score(self, user_ids: Sequence[int]) -> Scored:
        """Features, trust and score of a batch of users: one GetFeatures for
        the batch, GetFreshness at most every few seconds (cached)."""
        freshness = self.client.freshness()
        trusted = {view for view, f in freshness.items() if f.trusted}
        response = self.client.get_features(FEATURES, user_ids)
        # Windows were evaluated as of served_at: measure ages from it too.
        served_at = response.served_at.ToDatetime(tzinfo=dt.UTC)
        rows = decode(response)
        vectors = [vector(r, trusted, served_at) for r in rows]
        return Scored(
            freshness, trusted, list(user_ids), list(response.feature_names), rows, vectors, [predict(v) for v in vectors], served_at
        )


@dataclasses.dataclass
class Scored:
    freshness: dict[str, ViewFreshness]
    trusted: set[str]
    user_ids: list[int]
    names: list[str]
    rows: list[dict[str, Feature]]
    vectors: list[list[float]]
    scores: list[float]
    served_at: dt.datetime
