"""Example Freshet client: see client.py (channel, retries, auth, decoding),
model.py (a model server's use of it) and example.py (the CLI)."""

from .client import Feature, FreshetClient, ViewFreshness, decode, make_channel

__all__ = ["Feature", "FreshetClient", "ViewFreshness", "decode", "make_channel"]
