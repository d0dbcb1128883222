"""token_stats under torch.compile (no graph breaks) and the custom ops' registration (opcheck)."""
import pytest
import torch

import hotloop

from helpers import rel_err


def _loss(logits, labels):
    out = hotloop.token_stats(logits, labels, temperature=0.9, self_certainty=True)
    return (out.logprobs * 2).sum() + out.entropy.sum() - out.self_certainty.mean()


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    logits = torch.randn(3, 5, 257)
    labels = torch.randint(0, 257, (3, 5))
    labels[0, 1] = -100
    compiled = torch.compile(_loss, fullgraph=True)
    x_eager, x_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, comp = _loss(x_eager, labels), compiled(x_comp, labels)
    eager.backward()
    comp.backward()
    assert rel_err(comp.detach(), eager.detach()) < 1e-6
    assert rel_err(x_comp.grad, x_eager.grad) < 1e-6


def _sample_inputs():
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 4, 33, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 33, (2, 4))
        labels[1, 0] = -100
        yield (logits, labels, 0.8, -100, True, True, False)
        yield (logits, labels, 1.0, -100, False, False, False)


@pytest.mark.parametrize("args", list(_sample_inputs()), ids=lambda a: f"{a[0].dtype}-entropy{a[4]}")
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.hotloop.token_stats_fwd.default, args)


def test_opcheck_backward():
    logits = torch.randn(2, 4, 33)
    labels = torch.randint(0, 33, (2, 4))
    lp, ent, _, lse = torch.ops.hotloop.token_stats_fwd(logits, labels, 1.0, -100, True, False, False)
    args = (torch.randn(2, 4), torch.randn(2, 4), None, logits, labels, lse, ent, 1.0, -100)
    torch.library.opcheck(torch.ops.hotloop.token_stats_bwd.default, args)
    torch.library.opcheck(torch.ops.hotloop.token_stats_bwd_inplace.default, (*args[:3], logits.clone(), *args[4:]))
