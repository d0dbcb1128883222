"""Hugging Face causal LMs taken apart for the fused hidden-state losses: the backbone (everything but the
lm_head), the lm_head's weight and bias, and the last hidden states lined up with the tokens they predict.

    causal_lm_parts(model)                                  (backbone, lm_head weight, bias)
    hidden_states(model, input_ids, attention_mask)         the backbone's last hidden states
    completion_parts(model, input_ids, attention_mask, C)   hidden states and labels of the last C tokens
    lm_parts(model, input_ids, attention_mask, labels)      hidden states and labels for next-token prediction

The functions are defined in hotloop.train.causal_lm (see its docstring for the models they accept), where the
training API that runs on them sits below this integration layer; they are imported here so that this name,
the documented one, keeps working.
"""
from hotloop.train.causal_lm import causal_lm_parts, completion_parts, hidden_states, lm_parts

__all__ = ["causal_lm_parts", "completion_parts", "hidden_states", "lm_parts"]
