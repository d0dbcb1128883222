"""EpisodicMemory: a fixed-capacity ring of keys (and optional values) searched with hotloop.knn (docs/knn.md).

Everything lives in tensors on the memory's device; the write pointer and fill count are device tensors too,
so `add`, `search` and `read` never synchronise with the host (apart from the optional finiteness check of new
keys / queries, see hotloop.knn). `len(memory)` reads the count, which is one host sync on GPU.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from hotloop._internal.checks import check_positive, check_tensor
from hotloop.ops.knn import KNN_DTYPES, check_finite, check_k, knn_unchecked_keys
from hotloop.contracts import KNN_METRICS as METRICS

_OP = "EpisodicMemory"
WEIGHTINGS = ("softmax", "inverse_distance")
_STATE_FORMAT = 1


class EpisodicMemory:
    """A ring buffer of `capacity` keys [dim] with optional values [value_dim], searched by exact kNN.

    Args:
        dim: key dimension d.
        capacity: number of slots; once full, `add` overwrites the oldest entries first.
        value_dim: dimension of the values stored beside the keys, or None for a key-only memory.
        metric: "l2" (squared distance), "ip" or "cosine", as in hotloop.knn.
        device, dtype: where and how keys and values are stored (float32 / bfloat16 / float16).

    Slots are filled 0, 1, ..., capacity - 1, then overwritten in the same order; a slot index returned by
    `add` / `search` stays valid until that slot is overwritten. The memory also holds the running statistics
    of the rewards computed from it (hotloop.novelty_reward, hotloop.memory_rewards); `clear` resets them.
    """

    def __init__(self, dim: int, capacity: int, *, value_dim: int | None = None, metric: str = "l2",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        for name, val in (("dim", dim), ("capacity", capacity), ("value_dim", value_dim)):
            if val is None and name == "value_dim":
                continue
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"hotloop.{_OP}: `{name}` must be an int >= 1, got {val!r}")
        if metric not in METRICS:
            raise ValueError(f"hotloop.{_OP}: `metric` must be one of {METRICS}, got {metric!r}")
        if dtype not in KNN_DTYPES:
            raise TypeError(f"hotloop.{_OP}: `dtype` must be one of {[str(d) for d in KNN_DTYPES]}, got {dtype}")
        self.dim, self.capacity, self.value_dim, self.metric = dim, capacity, value_dim, metric
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.keys = torch.zeros(capacity, dim, dtype=dtype, device=dev)
        self.values = None if value_dim is None else torch.zeros(capacity, value_dim, dtype=dtype, device=dev)
        self._ptr = torch.zeros((), dtype=torch.int64, device=dev)    # next slot to write
        self._count = torch.zeros((), dtype=torch.int64, device=dev)  # filled slots, <= capacity
        self.stats: dict[str, Tensor] = {}  # reward statistics (running means, rolling windows), by name

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def __len__(self) -> int:
        return int(self._count)

    def valid_mask(self) -> Tensor:
        """[capacity] bool, True for filled slots (slots fill in index order, so it is arange < count)."""
        return torch.arange(self.capacity, device=self.device) < self._count

    def clear(self) -> None:
        """Forget every entry and the reward statistics (buffers are kept, nothing is reallocated)."""
        self._ptr.zero_()
        self._count.zero_()
        self.stats.clear()

    # ----------------------------------------------------------------------------------------------- writes
    def add(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        """Insert keys [n, dim] (and values [n, value_dim]) -> the slot of each row, [n] int64.

        Rows go to consecutive ring slots from the write pointer; with n > capacity only the last `capacity`
        rows are kept (their slots are returned for every row, the earlier rows' slots having been overwritten
        within the same call). Keys must be finite (checked as hotloop.knn checks its inputs)."""
        self._check_rows("keys", keys, self.dim)
        if (values is None) != (self.values is None):
            raise ValueError(f"hotloop.{_OP}: `values` must be given exactly when the memory has value_dim "
                             f"(value_dim={self.value_dim}), got {'none' if values is None else 'values'}")
        if values is not None:
            self._check_rows("values", values, self.value_dim)
            if values.shape[0] != keys.shape[0]:
                raise ValueError(f"hotloop.{_OP}: `values` must have one row per key ({keys.shape[0]}), "
                                 f"got {values.shape[0]}")
        check_finite(_OP, "keys", keys)
        n = keys.shape[0]
        slots = (self._ptr + torch.arange(n, device=self.device)) % self.capacity
        keep = slice(max(0, n - self.capacity), n)  # distinct slots only: index_copy_ with repeats is unordered
        self.keys.index_copy_(0, slots[keep], keys.detach()[keep])
        if values is not None:
            self.values.index_copy_(0, slots[keep], values.detach()[keep])
        self._ptr.copy_((self._ptr + n) % self.capacity)
        self._count.copy_(torch.clamp(self._count + n, max=self.capacity))
        return slots

    def _check_rows(self, name: str, t: Tensor, width: int) -> None:
        check_tensor(_OP, name, t)
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"hotloop.{_OP}: `{name}` must be [n, {width}], got shape {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise TypeError(f"hotloop.{_OP}: `{name}` must have the memory's dtype {self.dtype}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"hotloop.{_OP}: `{name}` is on {t.device} but the memory is on {self.device}")

    # ------------------------------------------------------------------------------------------------ reads
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """queries [Q, dim] -> (scores [Q, k] float32, slots [Q, k] int64), as hotloop.knn over the filled
        slots; k <= capacity, and rows are padded with slot -1 (score +inf for "l2", -inf otherwise) while the
        memory holds fewer than k entries."""
        self._check_rows("queries", queries, self.dim)
        check_k(_OP, k, self.capacity)
        return knn_unchecked_keys(queries, self.keys, k, self.metric, self.valid_mask())

    def read(self, queries: Tensor, k: int, weighting: str = "softmax", *, temperature: float = 1.0,
             delta: float = 1e-3) -> Tensor:
        """Weighted mean of the values of the k nearest entries: queries [Q, dim] -> [Q, value_dim] float32.

        With s_j the neighbours' similarity (-squared distance for "l2", the score for "ip" / "cosine"):
            "softmax"           w_j = softmax_j(s_j / temperature)
            "inverse_distance"  w_j = 1 / (dist_j + delta) normalised, dist_j the squared distance ("l2") or
                                1 - cosine ("cosine"; not defined for "ip"), as in NEC / DND
        Padding neighbours (memory holding fewer than k entries) get weight 0; a row with no neighbour is 0.
        A key-only memory (value_dim None) reads its keys."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"hotloop.{_OP}: `weighting` must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "inverse_distance" and self.metric == "ip":
            raise ValueError(f"hotloop.{_OP}: weighting='inverse_distance' needs metric 'l2' or 'cosine'")
        temperature = check_positive(_OP, "temperature", temperature)
        delta = check_positive(_OP, "delta", delta)
        scores, slots = self.search(queries, k)
        found = slots >= 0
        if weighting == "softmax":
            sim = -scores if self.metric == "l2" else scores
            logits = torch.where(found, sim / temperature, torch.full_like(sim, float("-inf")))
            w = torch.softmax(logits, dim=1).nan_to_num(0.0)  # all -inf (empty memory): NaN -> 0
        else:
            dist = scores if self.metric == "l2" else 1.0 - scores
            w = torch.where(found, 1.0 / (dist.clamp_min(0) + delta), torch.zeros_like(scores))
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)
        table = self.keys if self.values is None else self.values
        rows = table[slots.clamp_min(0)].float()  # [Q, k, width]; padding rows have weight 0
        return torch.einsum("qk,qkw->qw", w, rows)

    # ------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Config, keys, values, ring pointer / count and reward statistics (tensors are not copied)."""
        return {"format": _STATE_FORMAT, "dim": self.dim, "capacity": self.capacity, "value_dim": self.value_dim,
                "metric": self.metric, "dtype": str(self.dtype), "keys": self.keys, "values": self.values,
                "ptr": self._ptr, "count": self._count, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Copy a state_dict into this memory (same dim, capacity, value_dim, metric and dtype)."""
        for name in ("dim", "capacity", "value_dim", "metric"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"hotloop.{_OP}: state has {name}={state.get(name)!r}, this memory "
                                 f"{getattr(self, name)!r}")
        if state.get("dtype") != str(self.dtype):
            raise TypeError(f"hotloop.{_OP}: state has dtype {state.get('dtype')}, this memory {self.dtype}")
        self.keys.copy_(state["keys"])
        if self.values is not None:
            self.values.copy_(state["values"])
        self._ptr.copy_(state["ptr"])
        self._count.copy_(state["count"])
        self.stats = {name: t.to(self.device) for name, t in state["stats"].items()}

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> "EpisodicMemory":
        """Load a file written by `save` into this memory (tensors go straight to its device); returns self."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return self
