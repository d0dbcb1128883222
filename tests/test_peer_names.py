"""hotloop.peer_names, the one map from TRL / Liger / verl option names and values to hotloop's arguments: what it
maps to is what the ops accept (hotloop.contracts, linear_policy_loss's keywords), and nn, train and the TRL
integration read that same table rather than copies of it."""
import inspect

import hotloop
import hotloop.integrations.trl
import hotloop.nn
import hotloop.train.grpo
from hotloop import contracts, peer_names


def test_targets_are_hotloop_arguments():
    assert set(peer_names.LOSS_TYPES.values()) <= set(contracts.AGGS)
    assert set(peer_names.SCALE_REWARDS.values()) <= set(contracts.ADVANTAGE_SCALES)
    assert set(peer_names.ADVANTAGES) <= set(contracts.ADVANTAGE_KINDS)
    assert set(peer_names.TRL_DPO_LOSS_TYPES) <= set(contracts.PREFERENCE_KINDS)
    options = peer_names.policy_options(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dr_grpo",
                                        importance_sampling_level="sequence", max_completion_length=16,
                                        temperature=0.9)
    assert set(options) <= set(inspect.signature(hotloop.linear_policy_loss).parameters)
    assert options["agg"] == "dr_grpo" and options["importance"] in contracts.IMPORTANCE


def test_layers_share_the_table():
    assert hotloop.nn.LOSS_TYPES is peer_names.LOSS_TYPES  # hotloop.nn.LOSS_TYPES stays importable
    assert hotloop.train.grpo.LOSS_TYPES is peer_names.LOSS_TYPES
    assert hotloop.integrations.trl.LOSS_TYPES is peer_names.LOSS_TYPES
    assert hotloop.integrations.trl.TRL_DPO_LOSS_TYPES is peer_names.TRL_DPO_LOSS_TYPES
