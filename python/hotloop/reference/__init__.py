"""Plain-torch reference implementations: the spec (shared SPEC.md) in code, float32 math (float64 for float64 input)."""
from hotloop.reference.token_stats import token_stats_ref

__all__ = ["token_stats_ref"]
