"""One DPO training step's loss: hotloop.linear_preference_loss (last hidden states x lm_head -> per-sequence
log-prob sums -> sigmoid DPO loss, forward + backward, no [2P, T, V] logits) against TRL's and Liger's paths.

Every provider gets the same inputs in one process and returns the loss and its gradients w.r.t. hidden and
weight; its first call is checked against a materialised reference (float32; float64 for float32 inputs) before
it is timed.
    python -m benchmarks.bench_preference_loss [--quick] [--cases bf16] [--providers trl_materialised,liger]

Providers (batch layout: TRL's concatenated_forward, rows 0..P-1 chosen, P..2P-1 rejected)
  trl_materialised   TRL DPOTrainer's torch path before its fused LM head, written here: logits = F.linear in the
                     model dtype, selective_log_softmax (fp32: gather + a per-row logsumexp loop; bf16: a per-row
                     log_softmax + gather loop, so bf16 logits give bf16 log-probs and bf16 sums), masked sums per
                     sequence, -logsigmoid(beta * margin).mean(). (TRL also took logit means over the completion
                     tokens for logging, another [tokens, V] copy, left out here: a lower bound on its cost.)
  trl_fused_lm_head  TRL 1.16's DPOTrainer path (installed here): add_fused_lm_head's ChunkedLogProbFunction, tiles
                     of 4096 tokens x 32768 vocab, with the outputs DPOTrainer requests (entropy, mean logit, is-top1
                     for its metrics); like add_fused_lm_head it scores every token on CPU, the completion tokens only
                     on CUDA. Then the same sums and loss.
  liger              Liger-Kernel's LigerFusedLinearDPOLoss (sum log-probs, chunk_size 1: one pair a chunk),
                     compiled=False. It takes no precomputed reference log-probs: it recomputes them in each chunk
                     from ref_input (= hidden here) and ref_weight, as TRL's use_liger_kernel path fed it the
                     reference model's hidden states; that extra no-grad lm_head forward is in its timings.
  liger_compiled     the same with compiled=True (Liger's default): torch.compile of the per-chunk loss.
  hotloop            hotloop.linear_preference_loss (kind "sigmoid", layout "concatenated").

Inputs: beta 0.1 (TRL's default). Each row: a 64-token prompt (T/4 when shorter) masked out, then a completion of
length uniform in [T/4, T - prompt] (fixed seed), then padding. The reference policy is the same lm_head weight plus
noise (REF_NOISE of its scale); the reference log-probs are its float32 sums over the completions, so margins are
~1 and the pairs' sigmoid weights differ.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.fused_loss_driver import (FusedLossBench, Loss, Provider, materialised_logp, row_blocks,
                                          selective_log_softmax)

BENCH = "preference_loss"
MODULE = "benchmarks.bench_preference_loss"  # import path for the memory-probe child (not __main__)
BETA = 0.1        # TRL's and Liger's default
PROMPT = 64       # prompt tokens at the start of each row, masked out
REF_NOISE = 0.2   # reference lm_head = weight + REF_NOISE * (weight-scale noise)
IGNORE = -100     # Liger's ignore_index


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    p: int  # pairs: 2P rows
    t: int
    h: int
    v: int
    dtype: torch.dtype


def _case(p, t, h, v, dtype) -> Case:
    tag = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return Case(f"{p}pairs-{t}x{h}x{v}-{tag}", p, t, h, v, dtype)


BF16, FP32 = torch.bfloat16, torch.float32
CPU_CASES = [_case(4, 256, 1024, 32000, dt) for dt in (BF16, FP32)]
GPU_CASES = [_case(8, 2048, 4096, 128256, BF16)]
QUICK_CASES = [_case(2, 16, 32, 100, FP32)]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


# ------------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor        # [2P, T, H] model dtype
    weight: torch.Tensor        # [V, H] model dtype
    labels: torch.Tensor        # [2P, T] int64, random at masked positions too
    mask: torch.Tensor          # [2P, T] float32, 1 = completion token
    ref_weight: torch.Tensor    # [V, H] model dtype: the reference policy's lm_head (Liger recomputes from it)
    ref_chosen: torch.Tensor    # [P] float32 reference sequence log-prob sums
    ref_rejected: torch.Tensor  # [P]


def _lm_head_like(v: int, h: int, dtype, gen, dev, scale: float = 1.0, base: torch.Tensor | None = None):
    """base + scale * randn * 3 / sqrt(H) (logits of std ~3, a realistic lm_head scale), in row blocks: no
    full-size float32 temporary for a bf16 weight."""
    out = torch.empty(v, h, dtype=dtype, device=dev) if base is None else base.clone()
    rows = max(1, (1 << 24) // h)
    for s in range(0, v, rows):
        block = torch.randn(min(rows, v - s), h, generator=gen, device=dev).mul_(3 * scale * h ** -0.5)
        out[s:s + block.shape[0]] = block if base is None else block.add_(base[s:s + block.shape[0]])
        del block
    return out


def make_inputs(case: Case, dev: torch.device) -> Inputs:
    gen = torch.Generator(device=dev).manual_seed(0)
    R, T, H, V = 2 * case.p, case.t, case.h, case.v
    hidden = torch.randn(R, T, H, generator=gen, device=dev).to(case.dtype)
    weight = _lm_head_like(V, H, case.dtype, gen, dev)
    ref_weight = _lm_head_like(V, H, case.dtype, gen, dev, REF_NOISE, base=weight)
    labels = harness.random_labels(R * T, V, dev).view(R, T)
    prompt = min(PROMPT, T // 4)
    lengths = torch.randint(T // 4, T - prompt + 1, (R, 1), generator=gen, device=dev)
    pos = torch.arange(T, device=dev)
    mask = ((pos >= prompt) & (pos < prompt + lengths)).float()
    ref = (materialised_logp(hidden.view(-1, H), ref_weight, labels.view(-1), torch.float32).view(R, T) * mask).sum(1)
    return Inputs(hidden, weight, labels, mask, ref_weight, *ref.chunk(2))


# --------------------------------------------------------------------------------------------------- reference
def dpo_sigmoid(s: torch.Tensor, x: Inputs) -> torch.Tensor:
    """Sigmoid DPO loss from the [2P] sequence sums s (chosen first), in s's dtype promoted with the reference's:
    mean over pairs of -logsigmoid(beta ((s_w - ref_w) - (s_l - ref_l)))."""
    chosen, rejected = s.chunk(2)
    margin = (chosen - x.ref_chosen) - (rejected - x.ref_rejected)
    return -F.logsigmoid(BETA * margin).mean()


def reference(x: Inputs, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_hidden, d_weight) with materialised logits in `dt`. The loss depends on logp only through the
    masked sums, so g = dloss/dlogp = (dloss/ds)[row] * mask from autograd on [2P] alone; then dz = g (onehot(label)
    - softmax(z)) on row blocks of the logits, d_hidden = dz @ W, d_weight = dz^T @ hidden (no [N, V] graph)."""
    R, T, H = x.hidden.shape
    h, w, labels, m = x.hidden.view(-1, H).to(dt), x.weight.to(dt), x.labels.view(-1), x.mask.to(dt)
    s = (materialised_logp(h, w, labels, dt).view(R, T) * m).sum(1).requires_grad_(True)
    loss = dpo_sigmoid(s, x)
    g = (torch.autograd.grad(loss, s)[0][:, None] * m).view(-1)
    d_h, d_w = torch.empty_like(h), torch.zeros_like(w)
    with torch.no_grad():
        for s0, e in row_blocks(R * T, w.shape[0]):
            dz = torch.softmax(F.linear(h[s0:e], w), -1).mul_(-g[s0:e, None])
            dz[torch.arange(e - s0, device=dz.device), labels[s0:e]] += g[s0:e]
            d_h[s0:e] = dz @ w
            d_w.addmm_(dz.T, h[s0:e])
    return loss.detach(), d_h.view(R, T, H), d_w


# ---------------------------------------------------------------------------------------------------- providers
def make_trl(x: Inputs) -> Loss:
    keep = x.mask.bool()
    labels = x.labels.masked_fill(~keep, 0)  # TRL: labels[~loss_mask] = 0, then their log-probs zeroed

    def trl_materialised(hidden, weight):
        logits = F.linear(hidden, weight)  # [2P, T, V] in the model dtype, as the HF model returns
        logp = selective_log_softmax(logits, labels).masked_fill(~keep, 0)
        return dpo_sigmoid(logp.sum(-1), x)

    return trl_materialised


TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (importing that module takes ~10 s)
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks add_fused_lm_head for


def make_trl_fused(x: Inputs) -> Loss:
    from trl.kernels import ChunkedLogProbFunction

    keep = x.mask.bool()
    compact = x.hidden.is_cuda  # add_fused_lm_head: only the scored tokens where its Triton fold runs

    def trl_fused_lm_head(hidden, weight):
        h = hidden[keep] if compact else hidden.reshape(-1, hidden.shape[-1])
        labels = x.labels[keep] if compact else x.labels.masked_fill(~keep, 0).view(-1)
        logp = ChunkedLogProbFunction.apply(h, weight, None, labels, 1.0, TRL_VOCAB_TILE, None, 1.0,
                                            TRL_DPO_OUTPUTS)[0]
        logp = (logp.new_zeros(keep.shape).masked_scatter(keep, logp) if compact
                else logp.view(keep.shape).masked_fill(~keep, 0))
        return dpo_sigmoid(logp.sum(-1), x)

    return trl_fused_lm_head


def _make_liger(compiled: bool) -> Callable[[Inputs], Loss]:
    def make(x: Inputs) -> Loss:
        from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOLoss

        if compiled:
            torch._dynamo.reset()  # a cold compile per case: the first call is reported as compile time
        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compiled=compiled, use_ref_model=True,
                                          average_log_prob=False, loss_type="sigmoid")
        labels = x.labels.masked_fill(x.mask == 0, IGNORE)  # Liger masks by ignore_index only

        def liger(hidden, weight):
            return loss_fn(weight, hidden, labels, ref_input=x.hidden, ref_weight=x.ref_weight)[0]

        return liger

    return make


def make_hotloop(x: Inputs) -> Loss:
    from hotloop.ops.linear_preference_loss import linear_preference_loss

    def hot(hidden, weight):
        return linear_preference_loss(hidden, weight, x.labels, x.mask, ref_chosen_logps=x.ref_chosen,
                                      ref_rejected_logps=x.ref_rejected, layout="concatenated", kind="sigmoid",
                                      beta=BETA)[0]

    return hot


_LIGER = harness.importable("liger_kernel.chunked_loss.dpo_loss")
PROVIDERS = [
    Provider("trl_materialised", make_trl, bf16_caveat="TRL's log-probs and their sums stay bf16 (a sum near -1e3 "
                                                      "has spacing 4): TRL's precision"),
    Provider("trl_fused_lm_head", make_trl_fused, harness.importable("trl.kernels")),
    Provider("liger", _make_liger(compiled=False), _LIGER),
    Provider("liger_compiled", _make_liger(compiled=True), _LIGER, compiles=True, in_quick=False),
    Provider("hotloop", make_hotloop, harness.importable("hotloop.ops.linear_preference_loss")),
]
DRIVER = FusedLossBench(
    BENCH, MODULE, __doc__, PROVIDERS, CPU_CASES, GPU_CASES, QUICK_CASES, make_inputs, reference, tolerance,
    op="linear_preference_loss", mask_share="of tokens in completions", first_call_note=True,
    loss=f"sigmoid DPO, beta {BETA}, sequence log-prob sums over the completion tokens, mean over pairs; "
         "concatenated layout; forward + backward to d_hidden and d_weight")
probe_call = DRIVER.probe_call  # memory-probe entry (harness.peak_extra_bytes)
main = DRIVER.main              # -> records; run.py calls it with its argv


if __name__ == "__main__":
    print(harness.markdown_table(main()))
