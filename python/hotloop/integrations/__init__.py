"""Integrations with the libraries users already train with (import each submodule on its own; none is imported
here, so `import hotloop` never imports transformers or TRL):

    hotloop.integrations.transformers   backbone / lm_head / completion hidden states of any HF causal LM
    hotloop.integrations.trl            TRL's GRPOTrainer and DPOTrainer with hotloop's fused losses
"""
