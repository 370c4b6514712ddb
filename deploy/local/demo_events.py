"""Debezium-shaped change events for the demo, as `key|value` lines.

Usage: demo_events.py RATE:SECONDS [RATE:SECONDS ...]
Each phase emits RATE events a second for SECONDS. Users 1..50; event time
is the moment of emission, so freshness can be read off GetFreshness.
"""
import datetime
import json
import random
import sys
import time

TYPES = ["view", "click", "add_to_cart", "purchase"]


def main(phases):
    event_id = 0
    for phase in phases:
        rate, seconds = (int(x) for x in phase.split(":"))
        start = time.monotonic()
        for i in range(rate * seconds):
            target = start + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event_id += 1
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            row = {"event_id": event_id, "user_id": random.randint(1, 50), "event_type": random.choice(TYPES), "occurred_at": now}
            envelope = {"before": None, "after": row, "op": "c", "ts_ms": int(time.time() * 1000),
                        "source": {"table": "user_events", "schema": "public"}}
            print(json.dumps({"event_id": event_id}) + "|" + json.dumps(envelope), flush=(i % 50 == 0))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or ["200:10"])
