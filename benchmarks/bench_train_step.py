"""A whole GRPO training step of a Hugging Face Llama (backbone forward, loss, backward to every parameter):
hotloop.train.GRPO (hidden states x lm_head in the fused loss, no logits) against TRL's loss paths.

    python -m benchmarks.bench_train_step [--quick] [--cases ragged] [--providers trl_materialised]

Providers (same model, same batch, one process; the first call is checked before it is timed)
  trl_materialised  TRL's classic path: model(input_ids, attention_mask, logits_to_keep=C + 1).logits[:, :-1]
                    / temperature ([B, C, V] logits in the model dtype), TRL's selective_log_softmax, then its
                    GRPO loss math (coef = exp(logp - old), -min(coef A, clip(coef) A), loss_type "dapo":
                    token sum / token count).
  trl_fused_head    TRL >= 1.16's own path: trl.trainer.utils.add_fused_lm_head, model(..., labels,
                    fused_lm_head=True).log_probs (chunked over the vocabulary, entropy off), the same loss math.
  hotloop           hotloop.train.GRPO(loss_type="dapo").loss(model, batch).
Case: B responses (groups of 4) of a P-token prompt and a C-token completion; `full`: every completion token
valid; `ragged`: completion lengths uniform in [C/4, C] (fixed seed), the longest C, padding at the end (what TRL
pads to). On-policy (no old log-probs, ratio 1: TRL's single iteration), beta 0, temperature 1.
Correctness: loss and every parameter gradient against trl_materialised in float32 (an fp32 copy for bf16 cases):
the gradients' ||got - ref|| / ||ref|| and the loss's |got - ref| / max(|ref|, 1), the larger recorded.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable

import torch

from benchmarks import harness

BENCH = "train_step"
MODULE = "benchmarks.bench_train_step"
GROUP = 4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    p: int
    c: int
    h: int
    v: int
    layers: int
    dtype: torch.dtype
    ragged: bool


def _case(b, p, c, h, v, layers, dtype, mask) -> Case:
    tag = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return Case(f"llama-{layers}L-H{h}-V{v}-{b}x({p}+{c})-{tag}-{mask}", b, p, c, h, v, layers, dtype,
                mask == "ragged")


FP32, BF16 = torch.float32, torch.bfloat16
CPU_CASES = [_case(16, 32, 256, 512, 32000, 2, FP32, m) for m in ("full", "ragged")] + \
            [_case(16, 32, 256, 512, 32000, 2, BF16, "ragged")]
GPU_CASES = [_case(16, 128, 1024, 2048, 128256, 2, BF16, m) for m in ("full", "ragged")]
QUICK_CASES = [_case(4, 4, 12, 32, 128, 1, FP32, m) for m in ("full", "ragged")]
ALL_CASES = CPU_CASES + GPU_CASES + QUICK_CASES


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-2


def make_model(case: Case, dev: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, case.h // 64)
    cfg = LlamaConfig(vocab_size=case.v, hidden_size=case.h, intermediate_size=int(2.6875 * case.h) // 8 * 8,
                      num_hidden_layers=case.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=case.p + case.c, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype or case.dtype)
    return model.train()  # Llama has no dropout: train mode changes nothing but is what a step runs in


def make_batch(case: Case, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    B, P, C = case.b, case.p, case.c
    ids = torch.randint(0, case.v, (B, P + C), generator=g)
    mask = torch.ones(B, C, dtype=torch.long)
    if case.ragged:
        lengths = torch.randint(C // 4, C + 1, (B,), generator=g)
        lengths[lengths.argmax()] = C
        mask = (torch.arange(C)[None] < lengths[:, None]).long()
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    return {k: v.to(dev) for k, v in dict(input_ids=ids, attention_mask=attention, completion_mask=mask,
                                          rewards=rewards).items()}


def advantages(batch: dict) -> torch.Tensor:
    """TRL's: (r - group mean) / (group std + 1e-4), computed once outside the timed step (as in TRL)."""
    r = batch["rewards"].view(-1, GROUP)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def _trl_loss(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL GRPOTrainer._compute_loss, loss_type "dapo", on-policy, beta 0, one process and accumulation step."""
    coef_1 = torch.exp(logp - logp.detach())
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:  # the torch path TRL ships, for a machine without trl
        from benchmarks.fused_loss_driver import selective_log_softmax
    return selective_log_softmax


def make_trl_materialised(model, batch: dict) -> Callable[[], torch.Tensor]:
    sls, C = _selective_log_softmax(), batch["completion_mask"].shape[1]
    adv, mask, ids = advantages(batch), batch["completion_mask"], batch["input_ids"]

    def step():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=C + 1).logits
        logp = sls(logits[:, :-1] / 1.0, ids[:, -C:])
        return _trl_loss(logp, adv, mask)

    return step


def make_trl_fused_head(model, batch: dict) -> Callable[[], torch.Tensor]:
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=1.0)
    C, ids, am = batch["completion_mask"].shape[1], batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :-C] = -100
    adv, mask = advantages(batch), batch["completion_mask"]

    def step():
        logp = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True).log_probs[:, -C:]
        return _trl_loss(logp, adv, mask)

    return step


def make_hotloop(model, batch: dict) -> Callable[[], torch.Tensor]:
    import hotloop

    grpo = hotloop.train.GRPO(loss_type="dapo")
    inputs = {**batch, "advantages": advantages(batch)}
    return lambda: grpo.loss(model, inputs).loss


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable
    unavailable: Callable[[], str | None] = lambda: None


_TRANSFORMERS = harness.importable("transformers")


def _trl_fused_missing() -> str | None:
    try:
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        return "needs trl >= 1.16 (add_fused_lm_head)"
    return None


PROVIDERS = [Provider("trl_materialised", make_trl_materialised, _TRANSFORMERS),
             Provider("trl_fused_head", make_trl_fused_head, _trl_fused_missing),
             Provider("hotloop", make_hotloop, _TRANSFORMERS)]
BY_NAME = {p.name: p for p in PROVIDERS}


def make_call(p: Provider, case: Case, dev: torch.device, dtype: torch.dtype | None = None):
    """Zero-argument training step (zero grads, forward, loss, backward) -> (loss, flat parameter grads)."""
    model = make_model(case, dev, dtype)
    f = p.make(model, make_batch(case, dev))
    params = list(model.parameters())

    def step():
        model.zero_grad(set_to_none=True)
        loss = f()
        loss.backward()
        return loss.detach(), params

    return step


def probe_call(spec: dict) -> Callable[[], object]:
    case = next(c for c in ALL_CASES if c.name == spec["case"])
    return make_call(BY_NAME[spec["provider"]], case, harness.device())


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.float().reshape(-1) for p in params if p.grad is not None])


def bench_case(case: Case, providers: list[Provider], dev, rounds: int) -> list[harness.Record]:
    """Check each provider's first step, then time them interleaved (one step each per round, median over the
    rounds): load from other processes on a shared machine then hits every provider alike."""
    t0 = time.perf_counter()
    loss_ref, params = make_call(BY_NAME["trl_materialised"], case, dev, torch.float32)()
    ref = (loss_ref.float(), _flat_grads(params))
    del params
    print(f"[{BENCH}] {case.name} reference {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    records, calls = [], {}
    for p in providers:
        rec = harness.Record(BENCH, case.name, "step", p.name, note=p.unavailable() or "")
        records.append(rec)
        if rec.note:
            continue
        try:
            call = make_call(p, case, dev)
            loss, params = call()
            # the loss is a mean of O(|A|) ~ 1 terms that can cancel to ~0 (equal lengths, on-policy): its error
            # is taken relative to max(|ref|, 1), the gradients' relative to their norm
            loss_err = abs(loss.double().item() - ref[0].double().item()) / max(abs(ref[0].item()), 1.0)
            rec.max_rel_err = max(loss_err, harness.rel_err(_flat_grads(params), ref[1]))
            rec.correct = rec.max_rel_err < tolerance(case.dtype)
            if not rec.correct:
                rec.note = f"WRONG: rel err above {tolerance(case.dtype):g}"
            calls[p.name] = (rec, call)
        except Exception as exc:  # noqa: BLE001  (reported; the other providers still run)
            rec.correct, rec.note = False, harness.error_note(exc)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (_, call) in calls.items():
            harness.sync(dev)
            t1 = time.perf_counter()
            call()
            harness.sync(dev)
            times[name].append(time.perf_counter() - t1)
    for name, (rec, _) in calls.items():
        rec.ms, rec.reps = statistics.median(times[name]) * 1e3, rounds
    print(f"[{BENCH}] {case.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    harness.set_ratios(records)
    return records


def parse_args(argv):
    ap = harness.arg_parser(__doc__, "a 1-layer tiny Llama: a CI smoke test")
    ap.add_argument("--cases", help="comma-separated substrings of case names, e.g. ragged or bf16")
    ap.add_argument("--providers", help=f"comma-separated, from {','.join(BY_NAME)} (hotloop always runs)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per provider, interleaved (default 5)")
    return harness.parse_bench_args(ap, argv)


def main(argv=None) -> list[harness.Record]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = harness.device()
    cases = harness.select_cases(args, QUICK_CASES, GPU_CASES if dev.type == "cuda" else CPU_CASES)
    names = args.providers.split(",") if args.providers else [p.name for p in PROVIDERS]
    providers = [BY_NAME[n] for n in names if n in BY_NAME and n != "hotloop"] + [BY_NAME["hotloop"]]
    rounds = 1 if args.quick else args.rounds
    records, t0 = [], time.perf_counter()
    for case in cases:
        records += bench_case(case, providers, dev, rounds)
    t1 = time.perf_counter()
    if not args.no_memory:
        harness.measure_memory(BENCH, MODULE, records, quick=args.quick, announce=False)
    t2 = time.perf_counter()
    env = harness.env_info()
    extra = {"wall_s": {"timing": round(t1 - t0, 1), "memory": round(t2 - t1, 1)},
             "step": "zero_grad, backbone forward, GRPO loss (dapo, on-policy, beta 0), backward to every parameter",
             "peak_extra": harness.peak_extra_method(dev, "step")
             + "; includes activations and the parameter gradients"}
    return harness.save_results(BENCH, records, env, args, extra)


if __name__ == "__main__":
    print(harness.markdown_table(main()))
