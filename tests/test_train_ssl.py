"""hotloop.train's self-supervised steps (BYOL, DirectPred, DINO) at small MLPs: loss and gradients equal the
unfused composition (torch cosine / softmax cross-entropy with autograd), and the teacher / centre follow."""
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from hotloop.reference.dino_loss import dino_loss_ref

from hotloop import train

TOL = 1e-5


def _mlp(d_in=12, d_out=8, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, d_out))


def _grads(module):
    out = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    module.zero_grad(set_to_none=True)
    return out


def _cos_loss(p, z):
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)).mean()


def test_byol_matches_unfused_and_teacher_follows():
    online, predictor = _mlp(), _mlp(8, 8, seed=1)
    byol = train.BYOL(online, predictor, decay=0.9)
    with torch.no_grad():  # move the online net away from its teacher copy so the loss is not ~0
        for p in online.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    batch = {"view1": torch.randn(16, 12, generator=g), "view2": torch.randn(16, 12, generator=g)}
    out = byol.loss(online, batch)
    out.loss.backward()
    got = _grads(online)
    teacher = byol.teacher.module
    ref = (_cos_loss(predictor(online(batch["view1"])), teacher(batch["view2"]).detach())
           + _cos_loss(predictor(online(batch["view2"])), teacher(batch["view1"]).detach()))
    ref.backward()
    assert rel_err(out.loss.detach(), ref.detach()) < TOL
    assert rel_err(got, _grads(online)) < 1e-4
    predictor.zero_grad(set_to_none=True)
    before = [t.detach().clone() for t in teacher.parameters()]
    assert byol.update() == pytest.approx(0.9)
    for t, t0, s in zip(teacher.parameters(), before, online.parameters()):
        assert rel_err(t, 0.9 * t0 + 0.1 * s.detach()) < 1e-6


def test_directpred_sets_its_predictor_and_trains():
    online = _mlp()
    dp = train.DirectPred(online, dim=8, decay=0.99)
    opt = torch.optim.SGD(online.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(32, 12, generator=g)
        out = dp.loss(online, {"view1": x + 0.1 * torch.randn(32, 12, generator=g),
                               "view2": x + 0.1 * torch.randn(32, 12, generator=g)})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        dp.update()
    assert torch.isfinite(out.loss)
    assert not torch.allclose(dp.predictor.weight, torch.eye(8))  # W now comes from the feature correlation


def test_dino_matches_unfused_and_center_moves():
    student = _mlp(d_out=16)
    dino = train.DINO(student, out_dim=16, n_global=2, tau_s=0.1, tau_t=0.05, center_momentum=0.8)
    dino.center.copy_(0.1 * torch.randn(16))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    crops = [torch.randn(8, 12, generator=g) for _ in range(4)]  # 2 global + 2 local
    center = dino.center.clone()
    out = dino.loss(student, {"crops": crops})
    out.loss.backward()
    got = _grads(student)
    t_out = torch.cat([dino.teacher.module(c) for c in crops[:2]]).detach()
    ref = dino_loss_ref(torch.cat([student(c) for c in crops]), t_out, center, 2, 0.1, 0.05)
    ref.backward()
    assert rel_err(out.loss.detach(), ref.detach()) < TOL
    assert rel_err(got, _grads(student)) < 1e-4
    assert rel_err(dino.center, 0.8 * center + 0.2 * t_out.mean(0)) < 1e-6
    assert 0 < out.metrics["teacher_entropy"] < torch.log(torch.tensor(16.0))


def test_ssl_batches_are_checked():
    online = _mlp()
    with pytest.raises(KeyError, match="view2"):
        train.BYOL(online).loss(online, {"view1": torch.randn(2, 12)})
    with pytest.raises(ValueError, match="crops"):
        train.DINO(online, out_dim=8).loss(online, {"crops": [torch.randn(2, 12)] * 2})
