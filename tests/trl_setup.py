"""Tiny offline TRL trainers for the integration tests: a word-level tokenizer over digits and symbols built with
`tokenizers` (no hub download), a Llama from a config, and in-memory datasets."""
import tempfile

import pytest

trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from train_models import tiny_llama  # noqa: E402

SYMBOLS = ["<pad>", "<eos>"] + list("0123456789+=") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")  # one token per character
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    out.padding_side = "left"
    return out


def _model(seed=0):
    model = tiny_llama(seed=seed).train()
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, None
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.bos_token_id = None
    return model


def grpo_trainer(**config):
    """TRL defaults except float32 (TRL's CPU default is bf16 autocast; pass bf16=True for it)."""
    config.setdefault("bf16", False)
    def reward(completions, **kw):
        return [float(c.count("7")) + 0.1 * len(c) for c in completions]

    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                          logging_steps=1, learning_rate=1e-2, **config)
    ds = datasets.Dataset.from_dict({"prompt": ["12+3=", "4+5=", "7+1=", "2+2="] * 2})
    return trl.GRPOTrainer(model=_model(), reward_funcs=reward, args=args, train_dataset=ds,
                           processing_class=tokenizer())


def dpo_trainer(**config):
    config.setdefault("bf16", False)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2, **config)
    ds = datasets.Dataset.from_dict({"prompt": ["12+3=", "4+5=", "7+1=", "2+2="],
                                     "chosen": ["15", "9", "8", "4"], "rejected": ["16", "95", "71", "5"]})
    return trl.DPOTrainer(model=_model(), ref_model=_model(seed=7), args=args, train_dataset=ds,
                          processing_class=tokenizer())
