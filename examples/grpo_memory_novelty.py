"""Memory-augmented GRPO: the digit-addition task of grpo_digit_addition.py with an episodic-novelty bonus
(NGU, hotloop.novelty_reward over a hotloop.EpisodicMemory ring buffer of recent (prompt, answer) embeddings,
capped at 1) added to the task reward, so answers the policy has not tried lately for a prompt pay a little: exploration
against the early collapse onto one ones-digit. Writes examples/out/grpo_memory_novelty.png.

    python examples/grpo_memory_novelty.py [--steps 200] [--bonus 0.2] [--fast]
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

import hotloop
from _common import VOCAB, plot, progress
from grpo_digit_addition import ANSWER_LEN, grpo_parser, grpo_setup, grpo_step, prompts, reward, sample


def embed(prompt_ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """(a, b, answer digits) one-hot, [B, 4 * VOCAB]: the memory's keys (the digits sit at fixed positions)."""
    tokens = torch.cat([prompt_ids[:, 1:2], prompt_ids[:, 3:4], completion], 1)
    return F.one_hot(tokens, VOCAB).float().flatten(1)


def main() -> None:
    ap = grpo_parser(__doc__)
    ap.add_argument("--bonus", type=float, default=0.2, help="weight of the novelty reward")
    ap.add_argument("--capacity", type=int, default=2048, help="memory slots (the last ~16 steps' completions)")
    args = ap.parse_args()
    g, model, opt, grpo = grpo_setup(args)
    memory = hotloop.EpisodicMemory(4 * VOCAB, args.capacity, metric="l2")
    history = {"task reward": [], "novelty bonus": [], "exact-match accuracy": []}
    bar, t0 = progress(args.steps, "GRPO+novelty"), time.time()
    for _ in bar:
        prompt_ids, answers = prompts(args.prompts, g)
        prompt_ids = prompt_ids.repeat_interleave(args.generations, 0)
        answers = [a for a in answers for _ in range(args.generations)]
        model.eval()
        completion = sample(model, prompt_ids, ANSWER_LEN)
        scored = [reward(c, a) for c, a in zip(completion.tolist(), answers)]
        task = torch.tensor([r for r, _ in scored])
        keys = embed(prompt_ids, completion)
        # NGU's episodic novelty is 1 / c (= 1000) for a key with no near neighbour and 1 / sqrt(n) for one seen n
        # times among its k neighbours: capped at 1, the bonus is 1 for a new (prompt, answer), 1 / sqrt(n) after
        novelty = hotloop.novelty_reward(memory, keys, k=8).clamp(max=1.0)
        memory.add(keys)
        grpo_step(model, opt, grpo, prompt_ids, completion, task + args.bonus * novelty)
        acc = sum(ok for _, ok in scored) / len(scored)
        history["task reward"].append(task.mean().item())
        history["novelty bonus"].append(args.bonus * novelty.mean().item())
        history["exact-match accuracy"].append(acc)
        bar.set_postfix(task=f"{task.mean().item():.3f}", novelty=f"{novelty.mean().item():.3f}", acc=f"{acc:.2f}")
    k = max(1, args.steps // 10)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{args.steps} steps in {time.time() - t0:.0f} s; task reward {mean(history['task reward'][:k]):.3f} -> "
          f"{mean(history['task reward'][-k:]):.3f}, exact match {mean(history['exact-match accuracy'][-k:]):.2f}")
    plot(history, os.path.join(args.out, "grpo_memory_novelty.png"), "GRPO + episodic novelty (hotloop)")


if __name__ == "__main__":
    main()
