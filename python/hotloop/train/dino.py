"""DINO steps: a student regresses an EMA teacher's centred, sharpened outputs on every pair of different crops
(hotloop.dino_loss, one fused pass with its gradient), with the running centre (hotloop.update_center_) and the
teacher's fused EMA update (hotloop.EMATeacher). The issue-6 modules load on first use."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hotloop.train._backbone import Output, check_batch, require


class DINO:
    """One DINO loss per batch {"crops": [global_1, ..., global_G, local_1, ...]}, each crop [B, ...] (the global
    crops first; the teacher sees those only; local crops may have another resolution).

    Args:
        student: the student network (backbone + DINO head), outputs [B, K]; `loss(student, batch)` takes it again.
        out_dim: K.  n_global: G (DINO: 2).  tau_s, tau_t: student / teacher temperatures (0.1 / 0.04..0.07).
        center_momentum: the centre's EMA factor (0.9).
        decay, schedule, total_steps: the teacher's EMA (DINO: 0.996 rising to 1 by cosine).

    Call `update(step)` after the optimizer step (teacher EMA). Metrics: teacher entropy of the centred, sharpened
    distribution (a collapse watch: 0 = one-hot collapse, log K = uniform collapse).
    """

    def __init__(self, student: nn.Module, out_dim: int, *, n_global: int = 2, tau_s: float = 0.1,
                 tau_t: float = 0.04, center_momentum: float = 0.9, decay: float = 0.996, schedule: str = "constant",
                 total_steps: int | None = None):
        from hotloop.ema_teacher import EMATeacher

        self.teacher = EMATeacher(student, decay=decay, schedule=schedule, total_steps=total_steps)
        device = next(student.parameters()).device
        self.center = torch.zeros(out_dim, device=device)
        self.n_global, self.tau_s, self.tau_t, self.center_momentum = n_global, tau_s, tau_t, center_momentum

    def loss(self, student: nn.Module, batch: dict) -> Output:
        from hotloop.ops.dino_loss import dino_loss, update_center_

        check_batch("DINO", batch, ("crops",))
        crops = batch.get("crops")
        if not isinstance(crops, (list, tuple)) or len(crops) <= self.n_global:
            raise ValueError(f"hotloop.train.DINO: batch['crops'] must be a list of more than n_global = "
                             f"{self.n_global} crop tensors (global first), got {type(crops).__name__}")
        for i, c in enumerate(crops):
            require("DINO", {f"crops[{i}]": c}, f"crops[{i}]")
        with torch.no_grad():
            teacher_out = torch.cat([self.teacher.module(c) for c in crops[:self.n_global]])
        student_out = torch.cat([student(c) for c in crops])
        loss = dino_loss(student_out, teacher_out, self.center, n_global=self.n_global, tau_s=self.tau_s,
                         tau_t=self.tau_t)
        metrics = {"teacher_entropy": _entropy((teacher_out - self.center) / self.tau_t)}
        update_center_(self.center, teacher_out, self.center_momentum)  # after the loss, as DINO does
        return Output(loss, metrics)

    def update(self, step: int | None = None) -> float:
        """Move the teacher towards the student; returns the decay used."""
        return self.teacher.update(step)


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()
