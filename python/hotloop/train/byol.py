"""BYOL and DirectPred steps: an online network (+ predictor) regresses an EMA teacher's projection of the other
view (hotloop.byol_loss, symmetrised over the two views as BYOL does), the teacher following by hotloop's fused
EMA update (hotloop.EMATeacher). DirectPred swaps the learned predictor for one set from the feature correlation.
The issue-6 modules (ema_teacher, byol_loss, direct_pred) load on first use."""
from __future__ import annotations

import torch
from torch import nn

from hotloop.train._backbone import Output, check_batch, require


class BYOL:
    """One BYOL loss per batch {"view1": x1, "view2": x2} (two augmentations of the same B inputs).

    Args:
        online: the online network (encoder + projector), trained; `loss(online, batch)` takes it again so a
            trainer may hand in a wrapped copy.
        predictor: the online predictor (trained along); identity when None.
        decay, schedule, total_steps: the teacher's EMA (hotloop.EMATeacher; BYOL: 0.996 rising to 1 by cosine).

    loss(online, batch) = byol_loss(q(online(x1)), teacher(x2)) + byol_loss(q(online(x2)), teacher(x1)) where
    byol_loss is the batch mean of 2 - 2 cos; both views go through each network in one [2B] batch (BatchNorm
    statistics span both views). Call `update(step)` after the optimizer step to move the teacher.
    Metrics: the two directions' losses.
    """

    def __init__(self, online: nn.Module, predictor: nn.Module | None = None, *, decay: float = 0.996,
                 schedule: str = "constant", total_steps: int | None = None):
        from hotloop.ema_teacher import EMATeacher

        self.predictor = predictor if predictor is not None else nn.Identity()
        self.teacher = EMATeacher(online, decay=decay, schedule=schedule, total_steps=total_steps)

    def loss(self, online: nn.Module, batch: dict) -> Output:
        from hotloop.ops.byol_loss import byol_loss

        check_batch("BYOL", batch, ("view1", "view2"))
        x1, x2 = require("BYOL", batch, "view1"), require("BYOL", batch, "view2")
        both = torch.cat([x1, x2])  # one forward per network for the two views (a predictor that updates
        B = x1.shape[0]             # itself in forward, as DirectPredictor, must run once per backward)
        with torch.no_grad():
            z = self.teacher.module(both)
        p = self.predictor(online(both))
        l12, l21 = byol_loss(p[:B], z[B:]), byol_loss(p[B:], z[:B])
        return Output(l12 + l21, {"loss_12": l12.detach(), "loss_21": l21.detach()})

    def update(self, step: int | None = None) -> float:
        """Move the teacher towards the online network; returns the decay used."""
        return self.teacher.update(step)


class DirectPred(BYOL):
    """BYOL with hotloop.DirectPredictor: the predictor W is set from the EMA correlation of the online
    projections (eigen-decomposition, no gradient steps on it); `dim` is the projection width. Other arguments as
    BYOL, plus DirectPredictor's rho / eps / freq / mode ("directpred" or "directcopy")."""

    def __init__(self, online: nn.Module, dim: int, *, rho: float = 0.3, eps: float = 0.01, freq: int = 1,
                 mode: str = "directpred", decay: float = 0.996, schedule: str = "constant",
                 total_steps: int | None = None):
        from hotloop.direct_pred import DirectPredictor

        super().__init__(online, DirectPredictor(dim, rho=rho, eps=eps, freq=freq, mode=mode), decay=decay,
                         schedule=schedule, total_steps=total_steps)
