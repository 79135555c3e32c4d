"""The notes' worked example: a 1-1-1-1 sigmoid chain, no bias, binary cross-entropy.

    a(1) = x,  z(2) = w(1) a(1),  a(2) = σ(z(2)),  ...,  ŷ = a(4)
    J = −[y ln ŷ + (1 − y) ln(1 − ŷ)]
    ∂J/∂w(3) = −(y − a(4)) a(3)            δ(4) = a(4) − y
    δ(3) = δ(4) w(3) σ'(z(3))              ∂J/∂w(l) = δ(l+1) a(l)
"""

import math

import pytest
import torch

import manual_backprop.nn as mnn

W1, W2, W3 = 0.01, 0.1, -0.3


def sigma(z):
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("x,y", [(1.0, 1.0), (0.5, 0.0), (-2.0, 1.0)])
def test_sigmoid_chain_by_hand(x, y):
    # By hand, with floats, exactly as the notes write it.
    a1 = x
    a2 = sigma(W1 * a1)
    a3 = sigma(W2 * a2)
    z4 = W3 * a3
    a4 = sigma(z4)
    J = -(y * math.log(a4) + (1 - y) * math.log(1 - a4))
    dJ_dw3 = -(y - a4) * a3
    delta4 = a4 - y
    delta3 = delta4 * W3 * a3 * (1 - a3)  # σ'(z(3)) = a(3)(1 − a(3))
    delta2 = delta3 * W2 * a2 * (1 - a2)
    dJ_dw2 = delta3 * a2
    dJ_dw1 = delta2 * a1

    # The same network from our modules.
    layers = [mnn.Linear(1, 1, bias=False).double() for _ in range(3)]
    with torch.no_grad():
        for layer, w in zip(layers, (W1, W2, W3)):
            layer.weight.fill_(w)
    captured = {}
    a = torch.tensor([[x]], dtype=torch.float64)
    for depth, layer in enumerate(layers, start=2):
        z = layer(a)
        z.register_hook(lambda grad, depth=depth: captured.__setitem__(depth, grad.item()))
        a = mnn.Sigmoid()(z)
    loss = mnn.BCELoss()(a, torch.tensor([[y]], dtype=torch.float64))
    assert type(loss.grad_fn).__name__ == "BinaryCrossEntropyBackward"
    loss.backward()

    assert loss.item() == pytest.approx(J, rel=1e-12)
    assert captured[4] == pytest.approx(delta4, rel=1e-12)  # δ(4) = ŷ − y
    assert captured[3] == pytest.approx(delta3, rel=1e-12)  # δ(3) = δ(4) w(3) σ'(z(3))
    assert captured[2] == pytest.approx(delta2, rel=1e-12)
    assert layers[2].weight.grad.item() == pytest.approx(dJ_dw3, rel=1e-12)  # −(y − a(4)) a(3)
    assert layers[1].weight.grad.item() == pytest.approx(dJ_dw2, rel=1e-12)
    assert layers[0].weight.grad.item() == pytest.approx(dJ_dw1, rel=1e-12)
