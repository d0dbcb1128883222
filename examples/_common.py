"""Shared bits of the examples: a tiny Llama from a config (no download), a character vocabulary, a progress bar
(tqdm when installed, else plain prints) and the reward / loss plot (matplotlib when installed, else printed)."""
from __future__ import annotations

import os

import torch

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+=-<>abcdefghijklmnopqrstuvwxyz"
VOCAB = 3 + len(CHARS)


def encode(text: str) -> list[int]:
    return [3 + CHARS.index(ch) for ch in text]


def decode(ids) -> str:
    return "".join(CHARS[i - 3] if i >= 3 else "" for i in ids)


def tiny_llama(hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def progress(steps: int, desc: str):
    """An iterator over range(steps) with .set_postfix(**metrics): tqdm, or a print every ~10%."""
    try:
        from tqdm import tqdm

        return tqdm(range(steps), desc=desc)
    except ImportError:
        return _Prints(steps, desc)


class _Prints:
    def __init__(self, steps: int, desc: str):
        self.steps, self.desc, self.every, self.post = steps, desc, max(1, steps // 10), {}

    def __iter__(self):
        for i in range(self.steps):
            yield i
            if (i + 1) % self.every == 0 or i + 1 == self.steps:
                print(f"{self.desc} {i + 1}/{self.steps} " + " ".join(f"{k}={v}" for k, v in self.post.items()))

    def set_postfix(self, **metrics):
        self.post = metrics


def plot(history: dict[str, list[float]], path: str, title: str) -> None:
    """One panel per series against the step; printed (every ~10th step) when matplotlib is missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no {path}; the curves)")
        n = len(next(iter(history.values())))
        for i in range(0, n, max(1, n // 10)):
            print(f"step {i}: " + " ".join(f"{k}={v[i]:.3f}" for k, v in history.items()))
        return
    fig, axes = plt.subplots(1, len(history), figsize=(4.5 * len(history), 3.2))
    for ax, (name, values) in zip(axes if len(history) > 1 else [axes], history.items()):
        ax.plot(values)
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
