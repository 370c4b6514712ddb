"""Prints GetFreshness (grpcurl's JSON on stdin) as one line per view."""
import json
import sys

response = json.load(sys.stdin)
for view in response.get("views", []):
    lag = sum(int(p.get("lagRecords", 0)) for p in view.get("partitions", []))
    verdict = view.get("verdict", "UNKNOWN")
    age = view.get("age", "0s")
    print(f"  {view['view']:14} verdict={verdict:9} lag={lag:6} age={age}")
