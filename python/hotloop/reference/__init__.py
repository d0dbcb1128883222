"""Plain-torch reference implementations: the math of docs/ in code, float32 math (float64 for float64 input)."""
from hotloop.reference.group_advantages import group_advantages_ref
from hotloop.reference.linear_token_stats import linear_token_stats_ref
from hotloop.reference.token_stats import token_stats_ref

__all__ = ["group_advantages_ref", "linear_token_stats_ref", "token_stats_ref"]
