"""BYOL / DirectPred on a small synthetic dataset: an MLP encoder learns, without labels, representations in which
10 Gaussian clusters (in 4 of 32 dimensions, under larger nuisance noise in the rest) separate; two augmented
views per point (nuisance redrawn, signal jittered), an EMA teacher (hotloop.EMATeacher through
hotloop.train.BYOL / DirectPred), hotloop.byol_loss. Reports the nearest-class-mean accuracy of the frozen
features (a linear-probe stand-in) before and after, and writes examples/out/<method>_synthetic.png. Under a
minute on 2 CPU cores.

    python examples/byol_synthetic.py [--method byol|directpred] [--steps 200] [--fast]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import hotloop
from _common import plot, progress

DIM, CLASSES = 32, 10


SIGNAL = torch.randperm(DIM, generator=torch.Generator().manual_seed(123))[:4]  # where the clusters live


def dataset(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means in 4 of the 32 dimensions; the other 28 hold larger nuisance noise."""
    means = torch.randn(CLASSES, 4, generator=torch.Generator().manual_seed(7)) * 2.0
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, DIM, generator=g) * 2.0
    x[:, SIGNAL] = means[labels] + 0.3 * torch.randn(n, 4, generator=g)
    return x, labels


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A view: the nuisance dimensions redrawn, the signal jittered (the invariance BYOL is to find)."""
    view = torch.randn(x.shape, generator=g) * 2.0
    view[:, SIGNAL] = x[:, SIGNAL] + 0.3 * torch.randn(x.shape[0], 4, generator=g)
    return view


def mlp(d_in: int, d_out: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@torch.no_grad()
def probe_accuracy(encoder: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Nearest-class-mean accuracy of normalised features: class means from the first half, tested on the rest."""
    encoder.eval()
    f = torch.nn.functional.normalize(encoder(x), dim=-1)
    encoder.train()
    half = x.shape[0] // 2
    means = torch.stack([f[:half][y[:half] == c].mean(0) for c in range(CLASSES)])
    return (torch.cdist(f[half:], means).argmin(1) == y[half:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("byol", "directpred"), default="byol")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fast", action="store_true", help="a few small steps (for tests)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    if args.fast:
        args.steps, args.batch = 3, 32
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = dataset(4096, g)
    x_eval, y_eval = dataset(2048, torch.Generator().manual_seed(1))  # the same clusters, fresh points
    encoder, projector = mlp(DIM, 64), mlp(64, 32)
    online = nn.Sequential(encoder, projector)
    if args.method == "byol":
        step_fn = hotloop.train.BYOL(online, mlp(32, 32), decay=0.99, schedule="cosine", total_steps=args.steps)
        params = list(online.parameters()) + list(step_fn.predictor.parameters())
    else:
        step_fn = hotloop.train.DirectPred(online, dim=32, decay=0.99, schedule="cosine", total_steps=args.steps)
        params = list(online.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    before = probe_accuracy(encoder, x_eval, y_eval)
    history = {"loss": [], "probe accuracy": []}
    bar, t0 = progress(args.steps, args.method), time.time()
    for step in bar:
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        out = step_fn.loss(online, {"view1": augment(x[idx], g), "view2": augment(x[idx], g)})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        step_fn.update(step)
        history["loss"].append(out.loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            acc = probe_accuracy(encoder, x_eval, y_eval)
        history["probe accuracy"].append(acc)
        bar.set_postfix(loss=f"{out.loss.item():.3f}", probe=f"{acc:.2f}")
    print(f"{args.steps} steps in {time.time() - t0:.0f} s; nearest-class-mean accuracy of the features "
          f"{before:.2f} -> {history['probe accuracy'][-1]:.2f} (chance {1 / CLASSES:.2f})")
    plot(history, os.path.join(args.out, f"{args.method}_synthetic.png"), f"{args.method} (hotloop.train)")


if __name__ == "__main__":
    main()
