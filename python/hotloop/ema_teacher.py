"""EMATeacher: a teacher network that follows a student by EMA (BYOL, DINO, SPR, mean teachers, TR-DPO sync).

The teacher is a deep copy of the student (DDP's `.module` unwrapped), frozen, in eval mode. Its parameters
are the EMA state itself when `shadow_dtype` equals their dtype; otherwise (a bf16 student with a float32
shadow) a float32 shadow is kept next to them and every update writes the new bf16 teacher in the same pass
(hotloop.ema_update_ with out_copy). FSDP2 / DTensor parameters are updated shard by shard, locally.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hotloop.ops.ema import BUFFER_MODES, COPY_DTYPES, ema_update_

SCHEDULES = ("constant", "cosine")


def cosine_decay(base: float, step: int, total_steps: int) -> float:
    """BYOL / DINO schedule: d_k = 1 - (1 - d_0) (cos(pi k / K) + 1) / 2, k clamped to [0, K]: d_0 at k = 0, 1 at K."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (they keep it as `.module`)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return module.module if isinstance(module, wrappers) else module


class EMATeacher:
    """Keep an EMA copy of `module`.

    Args:
        module: the student (plain, DDP-wrapped, or FSDP2-sharded with DTensor parameters).
        decay: d_0, in [0, 1].
        schedule: "constant" (d = decay) or "cosine" (d rises from decay at step 0 to 1 at `total_steps`).
        total_steps: K for the cosine schedule (required there, >= 1).
        shadow_dtype: dtype of the EMA state of floating parameters: float32 (default) keeps a float32 shadow
            for a bf16 / fp16 student; None keeps each parameter's own dtype (no shadow).
        include_buffers: also track buffers (BatchNorm statistics, counters), per `buffer_mode`.
        buffer_mode: "copy" (default: take the student's buffers) or "average" (floating buffers averaged,
            integer buffers copied).

    `.module` is the teacher for forward (no grad). `update(step=None)` moves it towards the student given here
    (kept by reference), at the decay of `step`, or of its own counter (the number of updates so far) when
    step is None.
    """

    def __init__(self, module: nn.Module, *, decay: float = 0.996, schedule: str = "constant",
                 total_steps: int | None = None, shadow_dtype: torch.dtype | None = torch.float32,
                 include_buffers: bool = True, buffer_mode: str = "copy") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"hotloop.EMATeacher: `schedule` must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                     or total_steps < 1):
            raise ValueError(f"hotloop.EMATeacher: the cosine schedule needs `total_steps` >= 1, got {total_steps!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"hotloop.EMATeacher: `decay` must be a number in [0, 1], got {decay!r}")
        if shadow_dtype is not None and shadow_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"hotloop.EMATeacher: `shadow_dtype` must be float32, float64 or None, got {shadow_dtype}")
        if buffer_mode not in BUFFER_MODES[:2]:
            raise ValueError(f"hotloop.EMATeacher: `buffer_mode` must be 'copy' or 'average', got {buffer_mode!r}")
        self.decay, self.schedule, self.total_steps = float(decay), schedule, total_steps
        self.buffers = buffer_mode if include_buffers else "skip"
        self.step = 0
        self.student = module
        self.module = copy.deepcopy(_unwrap(module)).eval().requires_grad_(False)
        # the EMA state: per parameter either the teacher's own tensor or a shadow in shadow_dtype
        params = list(self.module.parameters())
        self._shadowed = [shadow_dtype is not None and p.is_floating_point() and p.dtype != shadow_dtype
                          and p.dtype in COPY_DTYPES for p in params]
        self.shadow = [p.detach().to(shadow_dtype) if s else None for p, s in zip(params, self._shadowed)]

    def current_decay(self, step: int | None = None) -> float:
        """The decay the next update uses (at `step`, or at the internal counter)."""
        k = self.step if step is None else step
        return self.decay if self.schedule == "constant" else cosine_decay(self.decay, k, self.total_steps)

    @torch.no_grad()
    def update(self, step: int | None = None) -> float:
        """teacher <- d * teacher + (1 - d) * student in one fused pass (buffers copied or averaged); returns d."""
        d = self.current_decay(step)
        student = _unwrap(self.student)
        s_params = list(student.parameters())
        t_params = list(self.module.parameters())
        if len(s_params) != len(t_params):
            raise ValueError(f"hotloop.EMATeacher.update: the student has {len(s_params)} parameters, the "
                             f"teacher {len(t_params)}")
        # one call: shadowed parameters update their float32 shadow and write the teacher's bf16 / fp16 copy in
        # the same pass (out_copy), the others are their own EMA state (no copy: None)
        target = [sh if sh is not None else t for t, sh in zip(t_params, self.shadow)]
        copies = [t if sh is not None else None for t, sh in zip(t_params, self.shadow)]
        has_copy = any(c is not None for c in copies)
        ema_update_(target, s_params, d, out_copy=copies if has_copy else None)
        if self.buffers != "skip":
            t_bufs, s_bufs = list(self.module.buffers()), list(student.buffers())
            if len(t_bufs) != len(s_bufs):
                raise ValueError(f"hotloop.EMATeacher.update: the student has {len(s_bufs)} buffers, the teacher "
                                 f"{len(t_bufs)}")
            avg = [self.buffers == "average" and t.is_floating_point() for t in t_bufs]
            if any(avg):
                ema_update_([t for t, a in zip(t_bufs, avg) if a], [s for s, a in zip(s_bufs, avg) if a], d)
            copied = [(t, s) for t, s, a in zip(t_bufs, s_bufs, avg) if not a]
            if copied:
                torch._foreach_copy_([t for t, _ in copied], [s for _, s in copied])
        self.step += 1
        return d

    def state_dict(self) -> dict:
        """{'teacher': the teacher's state_dict, 'shadow': float shadows (None where the parameter is its own
        state), 'step', 'decay', 'schedule', 'total_steps'}."""
        return {"teacher": self.module.state_dict(), "shadow": [None if s is None else s.clone() for s in self.shadow],
                "step": self.step, "decay": self.decay, "schedule": self.schedule, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["teacher"])
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"hotloop.EMATeacher.load_state_dict: {len(state['shadow'])} shadows for "
                             f"{len(self.shadow)} parameters")
        for mine, theirs in zip(self.shadow, state["shadow"]):
            if (mine is None) != (theirs is None):
                raise ValueError("hotloop.EMATeacher.load_state_dict: the shadow layout (shadow_dtype) differs")
            if mine is not None:
                mine.copy_(theirs)
        self.step, self.decay = int(state["step"]), float(state["decay"])
        self.schedule, self.total_steps = state["schedule"], state["total_steps"]
