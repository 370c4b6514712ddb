"""Command-line example: score a batch of users and print everything as JSON.

    python3 -m freshet_client.example --address 127.0.0.1:50051 --token T --users 1,2,404

Prints one JSON object on stdout (the same shape as the Go example's):

    {"client": "python",
     "features": ["user_activity:events_10s", ...],          # column order
     "freshness": {"orders": {"verdict": "FRESH", "trusted": true, "age_ms": 0, "budget_ms": 5000}, ...},
     "served_at_ms": 1767225600000,
     "users": [{"user": 1,
                "values": {"orders:spend_1h": {"status": "PRESENT", "value": 15.0, "event_time_ms": ...}, ...},
                "vector": [...],                              # the model's input, FEATURES order
                "score": 0.27}, ...]}

Timestamps (event times and timestamp values) are epoch milliseconds. On a
gRPC error it prints {"error": {"code": "UNAUTHENTICATED", "message": ...}}
and exits 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import grpc

from .client import FreshetClient
from .model import Model


def ms(t: dt.datetime) -> int:
    return round(t.timestamp() * 1000)


def jsonable(value):
    return ms(value) if isinstance(value, dt.datetime) else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m freshet_client.example", description=__doc__.split("\n")[0])
    p.add_argument("--address", default=os.environ.get("FRESHET_ADDRESS", "127.0.0.1:50051"), help="host:port of freshet-server")
    p.add_argument("--token", default=os.environ.get("FRESHET_TOKEN"), help="bearer token (default: $FRESHET_TOKEN)")
    p.add_argument("--users", default="1,2,404", help="comma-separated user ids (int64)")
    p.add_argument("--deadline-ms", type=int, default=500, help="deadline of each call, all retries included")
    p.add_argument("--tls-ca", help="PEM CA certificate: use TLS (default: plaintext)")
    args = p.parse_args(argv)
    users = [int(u) for u in args.users.split(",") if u.strip()]

    # One client (one channel) for the whole process.
    with FreshetClient(args.address, token=args.token, tls_ca=args.tls_ca, deadline_s=args.deadline_ms / 1000) as client:
        try:
            model = Model(client)
            scored = model.score(users)
        except grpc.RpcError as e:
            print(json.dumps({"error": {"code": e.code().name, "message": e.details()}}))
            return 1

    out = {
        "client": "python",
        "features": scored.names,
        "freshness": {
            view: {"verdict": f.verdict, "trusted": f.trusted, "age_ms": f.age_ms, "budget_ms": f.budget_ms}
            for view, f in sorted(scored.freshness.items())
        },
        "served_at_ms": ms(scored.served_at),
        "users": [
            {
                "user": user,
                "values": {
                    name: {
                        "status": f.status,
                        "value": jsonable(f.value),
                        "event_time_ms": ms(f.event_time) if f.event_time else None,
                    }
                    for name, f in row.items()
                },
                "vector": vec,
                "score": round(score, 6),
            }
            for user, row, vec, score in zip(scored.user_ids, scored.rows, scored.vectors, scored.scores)
        ],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
