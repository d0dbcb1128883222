"""DirectPredictor: BYOL / SimSiam's linear predictor set directly from the correlation of its inputs (docs/byol_loss.md).

DirectPred (Tian et al. 2021, "Understanding self-supervised learning dynamics without contrastive pairs"):
    F <- rho F + (1 - rho) mean_b(f f^T)        (the first update copies: F = mean_b(f f^T))
    F = U diag(s) U^T,  p_j = sqrt(max(s_j, 0) / max_j s_j) + eps  (floored at 1e-4),  W = U diag(p) U^T
DirectCopy (Wang et al. 2021): W = F / max_j s_j + eps I. We normalise F by its largest eigenvalue (its spectral
norm) so that W's scale matches DirectPred's (eigenvalues in [eps, 1 + eps]) whatever the feature scale; set
`normalize=False` for the raw W = F + eps I.
The correlation update is one GEMM with the running average fused in (torch.addmm with beta = rho); W is
recomputed every `freq` training steps. W is a buffer (not learned); the output still has a gradient w.r.t. x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("directpred", "directcopy")
_P_FLOOR = 1e-4


class DirectPredictor(nn.Module):
    """x [..., dim] -> x @ W^T, W [dim, dim] set from the EMA correlation of the inputs seen in training mode.

    Args:
        dim: feature size.
        rho: correlation EMA factor in [0, 1) (0.3 in DirectPred).
        eps: added to the eigen-amplitudes (directpred) or the diagonal (directcopy), >= 0.
        freq: recompute W every `freq` training forwards (>= 1).
        mode: "directpred" or "directcopy".
        normalize: directcopy only: divide F by its largest eigenvalue first (default True).
    Buffers: `weight` [dim, dim] (identity until the first update), `corr` [dim, dim] float32.
    """

    def __init__(self, dim: int, *, rho: float = 0.3, eps: float = 0.01, freq: int = 1, mode: str = "directpred",
                 normalize: bool = True) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"hotloop.DirectPredictor: `dim` must be an int >= 1, got {dim!r}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"hotloop.DirectPredictor: `rho` must lie in [0, 1), got {rho!r}")
        if not eps >= 0.0:
            raise ValueError(f"hotloop.DirectPredictor: `eps` must be >= 0, got {eps!r}")
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"hotloop.DirectPredictor: `freq` must be an int >= 1, got {freq!r}")
        if mode not in MODES:
            raise ValueError(f"hotloop.DirectPredictor: `mode` must be one of {MODES}, got {mode!r}")
        self.dim, self.rho, self.eps, self.freq, self.mode = dim, float(rho), float(eps), freq, mode
        self.normalize = normalize
        self.register_buffer("weight", torch.eye(dim))
        self.register_buffer("corr", torch.zeros(dim, dim))
        self.steps = 0  # training forwards seen (saved through get_extra_state)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"hotloop.DirectPredictor: input must be [..., {self.dim}], got {tuple(x.shape)}")
        if self.training:
            self.update(x)
        return F.linear(x, self.weight.to(x.dtype))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """F <- rho F + (1 - rho) mean_b(f f^T) from the detached features; W recomputed every `freq` calls."""
        f = x.detach().reshape(-1, self.dim).to(self.corr.dtype)
        # one non-finite feature would stay in the running correlation for good (every later eigh fails), so it
        # is refused before F changes; a host sync, as the eigh of the W update already is
        if not bool(torch.isfinite(f).all()):
            raise ValueError("hotloop.DirectPredictor: the training input holds NaN or inf; the correlation was "
                             "not updated (check the encoder's output, e.g. a diverged loss or a bad batch)")
        n = max(f.shape[0], 1)
        first = self.steps == 0
        # one GEMM with the EMA folded into its epilogue (beta scales the old F)
        self.corr.addmm_(f.T, f, beta=0.0 if first else self.rho, alpha=(1.0 if first else 1.0 - self.rho) / n)
        if self.steps % self.freq == 0:
            # a new tensor, not an in-place copy: an earlier forward's graph still holds the old W for its
            # backward (two views through the predictor before one backward, as BYOL / SimSiam do)
            self.weight = self.predictor_from(self.corr)
        self.steps += 1

    def predictor_from(self, corr: Tensor) -> Tensor:
        """W from a symmetric correlation F (float32 eigh; see the module docstring)."""
        try:
            s, U = torch.linalg.eigh(corr)
        except torch.linalg.LinAlgError as e:
            raise ValueError(f"hotloop.DirectPredictor: the eigendecomposition of the input correlation failed "
                             f"({e}); it must be a finite symmetric [dim, dim] matrix") from e
        top = s.max().clamp_min(torch.finfo(s.dtype).tiny)
        if self.mode == "directcopy":
            scale = 1.0 / top if self.normalize else 1.0
            return corr * scale + self.eps * torch.eye(self.dim, device=corr.device, dtype=corr.dtype)
        p = (s.clamp_min(0) / top).sqrt().add(self.eps).clamp_min(_P_FLOOR)
        return (U * p) @ U.T

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode}, rho={self.rho}, eps={self.eps}, freq={self.freq}"
