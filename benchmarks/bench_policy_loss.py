"""One GRPO training step's loss: hotloop.linear_policy_loss (last hidden states x lm_head -> clipped policy loss,
forward + backward, no [B, T, V] logits) against TRL's materialised path and Liger's fused GRPO loss.

Every provider gets the same inputs in one process and returns the loss and its gradients w.r.t. hidden and
weight; its first call is checked against a materialised reference (float32; float64 for float32 inputs) before
it is timed.
    python -m benchmarks.bench_policy_loss [--quick] [--cases ragged] [--providers trl_materialised,liger]

Providers
  trl_materialised  TRL GRPOTrainer's torch path, written here: logits = F.linear in the model dtype, / temperature,
                    selective_log_softmax (fp32: gather + a per-row logsumexp loop; bf16: a per-row log_softmax +
                    gather loop, so bf16 logits give bf16 log-probs), coef_1 = exp(logp - old), -min(coef_1 A,
                    clamp(coef_1) A) (+ beta k3), token mean. (TRL on CUDA may swap in its Triton log-prob kernel;
                    the logits are materialised either way.)
  liger             Liger-Kernel's LigerFusedLinearGRPOLoss, loss_type "bnpo" (sum(l m) / sum(m) over the batch:
                    token-mean), compiled=False: chunked log-probs and the loss math in eager torch.
  liger_compiled    the same with compiled=True (Liger's and TRL's default): torch.compile of the loss math only.
  hotloop           hotloop.linear_policy_loss (agg "token-mean", kl "k3").

Inputs: loss settings are TRL's defaults (clip 0.2 both sides, temperature 1, beta 0); one bf16 case adds the
k3 KL term (kl_coef 0.04 with ref_logp). Masks: `full` (every token valid) and `ragged`: each completion's length
uniform in [T/4, T] (fixed seed), the longest set to T, padding at the end. TRL pads completions to the longest in
the batch, so padding tokens are real work for the materialised path (and for Liger, which masks only the loss).
old_logp is the reference log-prob minus a log-ratio d: 0.05 * randn clamped to +-0.1, and 5% of tokens at
+-0.4 (ratio 1.49 or 0.67, clipped when the advantage's sign agrees). No token lies within 0.08 of a clip edge
(ln 1.2 = 0.18, ln 0.8 = -0.22): bf16 log-probs are off by ~1e-2, and a flipped clip decision would move a whole
token's gradient, failing the check without any provider being wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.fused_loss_driver import (FusedLossBench, Loss, Provider, materialised_logp, row_blocks,
                                          selective_log_softmax)

BENCH = "policy_loss"
MODULE = "benchmarks.bench_policy_loss"  # import path for the memory-probe child (not __main__)
CLIP = 0.2          # TRL's epsilon (low and high)
TEMPERATURE = 1.0   # TRL's default


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    h: int
    v: int
    dtype: torch.dtype
    ragged: bool
    kl_coef: float = 0.0


def _case(b, t, h, v, dtype, mask, kl_coef=0.0) -> Case:
    tag = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    kl = f"-kl{kl_coef:g}" if kl_coef else ""
    return Case(f"{b}x{t}x{h}x{v}-{tag}-{mask}{kl}", b, t, h, v, dtype, mask == "ragged", kl_coef)


BF16, FP32, MASKS = torch.bfloat16, torch.float32, ("full", "ragged")
CPU_CASES = ([_case(8, 256, 1024, 32000, dt, m) for dt in (BF16, FP32) for m in MASKS]
             + [_case(8, 256, 1024, 32000, BF16, "full", kl_coef=0.04)])
GPU_CASES = [_case(16, 1024, 4096, 128256, BF16, m) for m in MASKS]
QUICK_CASES = [_case(2, 16, 32, 100, FP32, m) for m in MASKS] + [_case(2, 16, 32, 100, FP32, "ragged", 0.04)]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


# ------------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor       # [B, T, H] model dtype
    weight: torch.Tensor       # [V, H] model dtype
    labels: torch.Tensor       # [B, T] int64
    mask: torch.Tensor         # [B, T] float32, 1 = completion token
    advantages: torch.Tensor   # [B] float32
    old_logp: torch.Tensor     # [B, T] float32
    ref_logp: torch.Tensor | None  # [B, T] float32 when kl_coef != 0
    kl_coef: float


def make_inputs(case: Case, dev: torch.device) -> Inputs:
    """hidden ~ randn, weight ~ randn * 3 / sqrt(H) (logits of std ~3, a realistic lm_head scale), labels
    uniform; advantages ~ randn per completion; old_logp / ref_logp from the float32 log-probs (module doc)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    B, T, H, V = case.b, case.t, case.h, case.v
    hidden = torch.randn(B, T, H, generator=gen, device=dev).to(case.dtype)
    weight = torch.empty(V, H, dtype=case.dtype, device=dev)
    rows = max(1, (1 << 24) // H)  # in row blocks: no full-size float32 temporary for a bf16 weight
    for s in range(0, V, rows):
        block = torch.randn(min(rows, V - s), H, generator=gen, device=dev)
        weight[s:s + block.shape[0]] = block.mul_(3 * H ** -0.5)
        del block
    labels = harness.random_labels(B * T, V, dev).view(B, T)
    advantages = torch.randn(B, generator=gen, device=dev)
    logp = materialised_logp(hidden.view(-1, H), weight, labels.view(-1), torch.float32, TEMPERATURE).view(B, T)
    d = (0.05 * torch.randn(B, T, generator=gen, device=dev)).clamp_(-0.1, 0.1)
    far = torch.rand(B, T, generator=gen, device=dev) < 0.05
    d = torch.where(far, 0.4 * torch.randn(B, T, generator=gen, device=dev).sign(), d)
    ref_logp = logp + 0.05 * torch.randn(B, T, generator=gen, device=dev) if case.kl_coef else None
    mask = torch.ones(B, T, device=dev)
    if case.ragged:  # drawn last: a ragged case differs from its full twin in the mask alone
        lengths = torch.randint(T // 4, T + 1, (B,), generator=gen, device=dev)
        lengths[lengths.argmax()] = T  # TRL pads to the longest completion: T is its length
        mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()
    return Inputs(hidden, weight, labels, mask, advantages, logp - d, ref_logp, case.kl_coef)


# --------------------------------------------------------------------------------------------------- reference
def spec_loss(logp: torch.Tensor, x: Inputs) -> torch.Tensor:
    """docs/policy_loss.md token-mean loss from log-probs [B, T], in logp's dtype: rho = exp(clamp(logp - old, -20, 20)),
    l = max(-A rho, -A clip(rho, 1 - clip, 1 + clip)) + kl_coef k3(logp - ref), sum(l m) / sum(m), with
    k3(d) = exp(clamp(-d, -20, 20)) + d - 1."""
    dt = logp.dtype
    rho = torch.exp((logp - x.old_logp.to(dt)).clamp(-20, 20))
    a = x.advantages.to(dt)[:, None]
    loss = torch.maximum(-a * rho, -a * rho.clamp(1 - CLIP, 1 + CLIP))
    if x.kl_coef:
        d = logp - x.ref_logp.to(dt)
        loss = loss + x.kl_coef * (torch.exp((-d).clamp(-20, 20)) + d - 1)
    m = x.mask.to(dt)
    return torch.where(m != 0, loss * m, 0.0).sum() / m.sum()  # masked tokens selected away, as the spec says


def reference(x: Inputs, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_hidden, d_weight) with materialised logits in `dt`. The loss is a sum of per-token terms of logp,
    so g = dloss/dlogp comes from autograd on [B, T] alone; then dz = g (onehot(label) - softmax(z)) / temperature
    on row blocks of the logits, d_hidden = dz @ W, d_weight = dz^T @ hidden (no [N, V] autograd graph)."""
    B, T, H = x.hidden.shape
    h, w, labels = x.hidden.view(-1, H).to(dt), x.weight.to(dt), x.labels.view(-1)
    logp = materialised_logp(h, w, labels, dt, TEMPERATURE).view(B, T).requires_grad_(True)
    loss = spec_loss(logp, x)
    g = torch.autograd.grad(loss, logp)[0].view(-1)
    d_h, d_w = torch.empty_like(h), torch.zeros_like(w)
    with torch.no_grad():
        for s, e in row_blocks(B * T, w.shape[0]):
            dz = torch.softmax(F.linear(h[s:e], w).div_(TEMPERATURE), -1).mul_(-g[s:e, None])
            dz[torch.arange(e - s, device=dz.device), labels[s:e]] += g[s:e]
            dz.div_(TEMPERATURE)
            d_h[s:e] = dz @ w
            d_w.addmm_(dz.T, h[s:e])
    return loss.detach(), d_h.view(B, T, H), d_w


# ---------------------------------------------------------------------------------------------------- providers
def make_trl(x: Inputs) -> Loss:
    def trl_materialised(hidden, weight):
        logits = F.linear(hidden, weight) / TEMPERATURE  # [B, T, V] in the model dtype, as the HF model returns
        logp = selective_log_softmax(logits, x.labels)
        coef_1 = torch.exp(logp - x.old_logp)
        coef_2 = coef_1.clamp(1 - CLIP, 1 + CLIP)
        a = x.advantages[:, None]
        per_token = -torch.min(coef_1 * a, coef_2 * a)
        if x.kl_coef:
            per_token = per_token + x.kl_coef * (torch.exp(x.ref_logp - logp) - (x.ref_logp - logp) - 1)
        return (per_token * x.mask).sum() / x.mask.sum().clamp(min=1.0)  # TRL's "bnpo" / "dapo": token mean

    return trl_materialised


def _make_liger(compiled: bool) -> Callable[[Inputs], Loss]:
    def make(x: Inputs) -> Loss:
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        if compiled:
            torch._dynamo.reset()  # a cold compile per case: the first call is reported as compile time
        # as TRL's GRPOTrainer builds it (use_ref_model only with a KL term; chunk_size 1: one completion a chunk)
        loss_fn = LigerFusedLinearGRPOLoss(beta=x.kl_coef, compiled=compiled, use_ref_model=x.kl_coef != 0,
                                           epsilon_low=CLIP, epsilon_high=CLIP, loss_type="bnpo",
                                           temperature=TEMPERATURE)

        def liger(hidden, weight):
            return loss_fn(hidden, weight, x.labels, x.mask, x.advantages, ref_per_token_logps=x.ref_logp,
                           old_per_token_logps=x.old_logp)[0]

        return liger

    return make


def make_hotloop(x: Inputs) -> Loss:
    import hotloop

    def hot(hidden, weight):
        return hotloop.linear_policy_loss(hidden, weight, x.labels, x.old_logp, x.advantages, x.mask,
                                          ref_logp=x.ref_logp, kl="k3", kl_coef=x.kl_coef, clip_low=CLIP,
                                          clip_high=CLIP, temperature=TEMPERATURE, agg="token-mean")[0]

    return hot


_LIGER = harness.importable("liger_kernel.chunked_loss.grpo_loss")
PROVIDERS = [
    Provider("trl_materialised", make_trl, bf16_caveat="TRL's log-probs stay bf16 (spacing 2^-4 at |logp| 8-16), "
                                                      "so its gradients are ~3e-2 off: TRL's precision"),
    Provider("liger", _make_liger(compiled=False), _LIGER),
    Provider("liger_compiled", _make_liger(compiled=True), _LIGER, compiles=True, in_quick=False),
    Provider("hotloop", make_hotloop, harness.importable("hotloop")),
]
DRIVER = FusedLossBench(
    BENCH, MODULE, __doc__, PROVIDERS, CPU_CASES, GPU_CASES, QUICK_CASES, make_inputs, reference, tolerance,
    op="linear_policy_loss", cases_example="bf16 or ragged",
    loss=f"GRPO clip {CLIP} both sides, temperature {TEMPERATURE}, token-mean; k3 KL where the case name says kl; "
         "forward + backward to d_hidden and d_weight")
probe_call = DRIVER.probe_call  # memory-probe entry (harness.peak_extra_bytes)
main = DRIVER.main              # -> records; run.py calls it with its argv


if __name__ == "__main__":
    print(harness.markdown_table(main()))
