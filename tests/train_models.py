"""Tiny Hugging Face causal LMs built from configs (no download) and batches for the training-API tests."""
import torch

transformers = __import__("pytest").importorskip("transformers")

V = 128


def tiny_llama(seed: int = 0, vocab: int = V, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()  # eval: no dropout, so two forwards agree


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()  # ties lm_head to the input embedding


def rl_batch(B: int = 8, P: int = 5, C: int = 7, seed: int = 1, left_pad: bool = True) -> dict:
    """Prompts (left-padded) + ragged completions, rewards, old / ref log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, V, (B, P + C), generator=g)
    attention_mask = torch.ones(B, P + C, dtype=torch.long)
    if left_pad:
        attention_mask[::3, :2] = 0
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    attention_mask[:, P:] = completion_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "rewards": torch.randint(0, 3, (B,), generator=g).float(),
            "old_logps": -4.8 + 0.3 * torch.randn(B, C, generator=g),
            "ref_logps": -4.8 + 0.3 * torch.randn(B, C, generator=g)}


def keep(batch: dict, *keys: str) -> dict:
    """The batch with only `keys` (the training classes refuse keys they do not read)."""
    return {k: batch[k] for k in keys}


SEQUENCE = ("input_ids", "attention_mask", "completion_mask")


def materialised_logits(model: torch.nn.Module, batch: dict, C: int, temperature: float = 1.0) -> torch.Tensor:
    """The unfused path: the full model's [B, C, V] logits at the positions predicting the last C tokens."""
    ids = batch["input_ids"]
    T = ids.shape[1]
    logits = model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits
    return logits[:, T - C - 1:-1] / temperature


def grads(model: torch.nn.Module) -> torch.Tensor:
    """All parameter gradients flattened (zeros where none), then cleared."""
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                     for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out
