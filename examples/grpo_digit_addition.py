"""GRPO from scratch on a verifiable toy task: a tiny Llama (built from a config, no download) learns single-digit
addition, "7+5=" -> "12", "3+4=" -> "07" (two digits), from rewards alone. The loss is hotloop.train.GRPO (the
logits never exist).

Reward per completion: 0.5 for each correct digit (1 = the exact answer; the partial credit makes a random
policy's group members differ, so GRPO has a signal from the first step); exact-match accuracy is reported too.
Runs on 2 CPU cores in about a minute and writes examples/out/grpo_reward.png (reward, accuracy, loss per step).

    python examples/grpo_digit_addition.py [--steps 200] [--fast]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import hotloop
from _common import BOS, EOS, PAD, decode, encode, plot, progress, tiny_llama

ANSWER_LEN = 2  # two digits, zero-padded


def prompts(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    a, b = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)
    ids = torch.tensor([[BOS] + encode(f"{x}+{y}=") for x, y in zip(a.tolist(), b.tolist())])
    return ids, (a + b).tolist()


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, max_new: int, temperature: float = 1.0) -> torch.Tensor:
    """Completions [B, max_new] by ancestral sampling; after <eos> the rest is padding."""
    ids, done = prompt_ids, torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    out = []
    for _ in range(max_new):
        logits = model(input_ids=ids).logits[:, -1] / temperature
        nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1)[:, 0]
        nxt = torch.where(done, PAD, nxt)
        out.append(nxt)
        done |= nxt == EOS
        ids = torch.cat([ids, nxt[:, None]], 1)
    return torch.stack(out, 1)


def reward(completion: list[int], answer: int) -> tuple[float, bool]:
    hits = [c == t for c, t in zip(completion, encode(f"{answer:02d}"))]
    return 0.5 * sum(hits), all(hits)


def grpo_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the GRPO examples (this one and grpo_memory_novelty.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fast", action="store_true", help="a few small steps (for tests)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return ap


def grpo_setup(args: argparse.Namespace):
    """Seeded prompt generator, tiny Llama, AdamW and the DAPO-style hotloop.train.GRPO loss of a GRPO example."""
    if args.fast:
        args.steps, args.prompts, args.generations = 3, 4, 4
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    grpo = hotloop.train.GRPO(num_generations=args.generations, loss_type="dapo", epsilon_high=0.28)
    return g, model, opt, grpo


def grpo_step(model, opt, grpo, prompt_ids: torch.Tensor, completion: torch.Tensor, rewards: torch.Tensor):
    """One optimiser step of hotloop.train.GRPO on sampled completions; -> its Output (loss, metrics)."""
    # the completion mask covers the tokens up to and including an early <eos>
    ended = (completion == EOS).cumsum(1)
    completion_mask = ((ended == 0) | ((ended == 1) & (completion == EOS))).long()
    batch = {"input_ids": torch.cat([prompt_ids, completion], 1), "completion_mask": completion_mask,
             "rewards": rewards}
    model.train()
    out = grpo.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out


def main() -> None:
    args = grpo_parser(__doc__).parse_args()
    g, model, opt, grpo = grpo_setup(args)
    history = {"reward": [], "exact-match accuracy": [], "loss": []}
    bar, t0 = progress(args.steps, "GRPO"), time.time()
    for _ in bar:
        prompt_ids, answers = prompts(args.prompts, g)
        prompt_ids = prompt_ids.repeat_interleave(args.generations, 0)  # the group of each prompt is adjacent
        answers = [a for a in answers for _ in range(args.generations)]
        model.eval()
        completion = sample(model, prompt_ids, ANSWER_LEN)
        scored = [reward(c, a) for c, a in zip(completion.tolist(), answers)]
        rewards = torch.tensor([r for r, _ in scored])
        out = grpo_step(model, opt, grpo, prompt_ids, completion, rewards)
        acc = sum(ok for _, ok in scored) / len(scored)
        history["reward"].append(rewards.mean().item())
        history["exact-match accuracy"].append(acc)
        history["loss"].append(out.loss.item())
        bar.set_postfix(reward=f"{rewards.mean().item():.3f}", acc=f"{acc:.2f}")
    k = max(1, args.steps // 10)
    first, last = sum(history["reward"][:k]) / k, sum(history["reward"][-k:]) / k
    print(f"{args.steps} steps in {time.time() - t0:.0f} s; mean reward of the first / last {k} steps: "
          f"{first:.3f} -> {last:.3f}; exact match {sum(history['exact-match accuracy'][-k:]) / k:.2f}")
    model.eval()
    ids, answers = prompts(4, g)
    for p, c, a in zip(ids, sample(model, ids, ANSWER_LEN, temperature=0.3), answers):
        print(f"  {decode(p.tolist())}{decode(c.tolist())}   (answer {a})")
    plot(history, os.path.join(args.out, "grpo_reward.png"), "GRPO (hotloop.train.GRPO), digit addition")


if __name__ == "__main__":
    main()
