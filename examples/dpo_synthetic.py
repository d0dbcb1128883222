"""DPO on synthetic preference pairs: a tiny Llama (built from a config, no download) learns to prefer the right
sum of two digits ("3+4=" chosen "7", rejected a wrong sum) over a frozen copy of itself as the reference.
The loss is hotloop.train.DPO (kind="sigmoid"; try --kind simpo / ipo / orpo / cream): no logits are built.

    python examples/dpo_synthetic.py [--steps 150] [--kind sigmoid] [--fast]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import hotloop
from _common import BOS, EOS, PAD, encode, plot, progress, tiny_llama

WIDTH = 8  # [BOS] a + b = ans ans EOS, right-padded


def pairs(n: int, g: torch.Generator) -> dict:
    """n chosen rows then n rejected rows (TRL's concatenated layout), completion_mask over the answer + EOS."""
    a, b = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)
    wrong = (a + b + torch.randint(1, 19, (n,), generator=g)) % 19
    rows, masks = [], []
    for answers in ((a + b).tolist(), wrong.tolist()):
        for x, y, ans in zip(a.tolist(), b.tolist(), answers):
            prompt, completion = [BOS] + encode(f"{x}+{y}="), encode(str(ans)) + [EOS]
            pad = WIDTH - len(prompt) - len(completion)
            rows.append(prompt + completion + [PAD] * pad)
            masks.append([0] * len(prompt) + [1] * len(completion) + [0] * pad)
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    return {"input_ids": ids, "attention_mask": (mask + (ids != PAD).long()).clamp(max=1), "completion_mask": mask,
            "consistency": torch.ones(n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pairs", type=int, default=32, help="preference pairs per step")
    ap.add_argument("--kind", default="sigmoid")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fast", action="store_true", help="a few small steps (for tests)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    if args.fast:
        args.steps, args.pairs = 3, 4
    g = torch.Generator().manual_seed(0)
    model = tiny_llama()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dpo = hotloop.train.DPO(kind=args.kind, beta=args.beta, ref_model=ref_model)
    history = {"loss": [], "reward accuracy": [], "reward margin": []}
    bar, t0 = progress(args.steps, "DPO"), time.time()
    for _ in bar:
        out = dpo.loss(model, pairs(args.pairs, g))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        history["loss"].append(out.loss.item())
        history["reward accuracy"].append(out.metrics["rewards/accuracies"].item())
        history["reward margin"].append(out.metrics["rewards/margins"].item())
        bar.set_postfix(loss=f"{out.loss.item():.3f}", acc=f"{history['reward accuracy'][-1]:.2f}")
    k = max(1, args.steps // 10)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{args.steps} steps in {time.time() - t0:.0f} s; loss {mean(history['loss'][:k]):.3f} -> "
          f"{mean(history['loss'][-k:]):.3f}, reward accuracy {mean(history['reward accuracy'][:k]):.2f} -> "
          f"{mean(history['reward accuracy'][-k:]):.2f} (held-out pairs each step)")
    plot(history, os.path.join(args.out, "dpo_synthetic.png"), f"DPO (hotloop.train.DPO, kind={args.kind})")


if __name__ == "__main__":
    main()
