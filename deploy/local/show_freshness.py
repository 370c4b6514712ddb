"""Prints GetFreshness (grpcurl's JSON on stdin) as one line per view."""
import json
import sys

response = json.load(sys.stdin)
for view in response.get("views", []):
    verdict = view.get("verdict", "UNKNOWN")
    age = view.get("age", "0s")
    partitions = " ".join(
        f"p{p.get('partition', 0)}:lag={p.get('lagRecords', '0')}"
        # A direct view's slot: unconfirmed and retained WAL on the source.
        + (f" wal={p['confirmedLagBytes']}/{p['retainedWalBytes']}B" if "retainedWalBytes" in p else "")
        for p in view.get("partitions", [])
    )
    print(f"  {view['view']:14} verdict={verdict:9} age={age:8} {partitions}")
for slot in response.get("replicationSlots", []):
    state = "active" if slot.get("active") else "INACTIVE"
    print(f"  slot {slot['name']:9} {state:8} lag={int(slot.get('lagBytes', 0)):>9} bytes  retained={int(slot.get('retainedBytes', 0)):>9} bytes")
