"""The hand-written input gradients of the networks equal torch.autograd (they are exported to ONNX and
drive the forces, so they must be exact)."""

import pytest
import torch

from training.model import MLP, LocFrameNet, SeANet


@pytest.mark.parametrize("hidden", [[8, 8, 8], [4, 8, 16], [7, 5, 3]])
def test_mlp_input_gradient_matches_autograd(hidden):
    torch.manual_seed(0)
    net = MLP(6, hidden, dtype=torch.float64)
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    e, g = net.energy_and_grad(x)
    (ga,) = torch.autograd.grad(e.sum(), x)
    assert torch.allclose(g, ga, rtol=1e-12, atol=1e-14)


def test_locframe_net_gradient_matches_autograd():
    torch.manual_seed(1)
    net = LocFrameNet(2, 30, [24, 12, 6], dtype=torch.float64)
    with torch.no_grad():
        net.mean.normal_()
        net.std.uniform_(0.5, 2.0)
    x = torch.randn(9, 30, dtype=torch.float64, requires_grad=True)
    for t in range(2):
        e, g = net.forward_type(t, x)
        (ga,) = torch.autograd.grad(e.sum(), x)
        assert torch.allclose(g, ga, rtol=1e-12, atol=1e-14)


def test_sea_net_gradient_matches_autograd():
    torch.manual_seed(2)
    net = SeANet(2, [5, 7], [4, 8, 16], 4, [12, 12], dtype=torch.float64)
    with torch.no_grad():
        net.std.uniform_(0.5, 2.0)
    R = torch.randn(6, 12, 4, dtype=torch.float64, requires_grad=True)
    for t in range(2):
        e, g = net.forward_type(t, R)
        (ga,) = torch.autograd.grad(e.sum(), R)
        assert torch.allclose(g, ga, rtol=1e-11, atol=1e-13)


def test_sea_net_is_invariant_to_slot_order_within_an_element():
    torch.manual_seed(3)
    net = SeANet(2, [5, 7], [4, 8, 16], 4, [12], dtype=torch.float64)
    R = torch.randn(3, 12, 4, dtype=torch.float64)
    perm = torch.cat([torch.randperm(5), 5 + torch.randperm(7)])
    e1, _ = net.forward_type(0, R)
    e2, _ = net.forward_type(0, R[:, perm])
    assert torch.allclose(e1, e2, rtol=1e-12)
