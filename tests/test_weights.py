"""The weight stores: each holds w + e and gives back w exactly (the same tensors, or the same bits in place)."""

from __future__ import annotations

import torch

from flatminima.optim.flat import FlatLayout
from flatminima.optim.weights import CopiedShards, FlatWeights, SwappedWeights
from tests.conftest import make_mlp


def _moved(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() + 0.5 for p in params]


def test_swapped_weights_restore_the_parameters_own_tensors() -> None:
    params = list(make_mlp().parameters())
    own = [p.data_ptr() for p in params]
    store = SwappedWeights()
    store.hold(params, _moved(params))
    assert store.perturbed and all(p.data_ptr() != w for p, w in zip(params, own, strict=True))
    store.restore()
    assert not store.perturbed
    assert [p.data_ptr() for p in params] == own  # the parameters' own tensors again: exact, and free
    store.restore()  # a second restore changes nothing


def test_copied_shards_write_in_place_and_copy_w_back() -> None:
    params = list(make_mlp().parameters())
    before = [p.detach().clone() for p in params]
    pointers = [p.data_ptr() for p in params]
    store = CopiedShards()
    with torch.no_grad():  # as SAM's first_step runs
        store.hold(params, _moved(params))
    assert store.perturbed and [p.data_ptr() for p in params] == pointers  # written into the same storage
    torch.testing.assert_close(params[0].detach(), before[0] + 0.5, rtol=0, atol=1e-6)
    with torch.no_grad():
        store.restore()
    assert not store.perturbed and [p.data_ptr() for p in params] == pointers
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # copied back: the same bits


def test_flat_weights_hold_in_the_buffer_and_fall_back_to_swapping() -> None:
    model = make_mlp(dtype=torch.float64)
    params = list(model.parameters())
    layout = FlatLayout(params)
    for p in params:
        p.grad = torch.ones_like(p)
    assert layout.adopt_gradients()
    before = layout.weights.clone()
    store = FlatWeights(layout)
    with torch.no_grad():
        store.hold_flat(0.25)  # w + 0.25 * 1: one correctly rounded addition, as before + 0.25 is: same bits
    assert store.perturbed and torch.equal(layout.weights, before + 0.25)
    with torch.no_grad():
        store.restore()
    assert not store.perturbed and torch.equal(layout.weights, before)
    own = [p.data_ptr() for p in params]
    store.hold(params, _moved(params))  # a step that does not fit the flat path swaps instead
    assert store.perturbed and not layout.weights_in_place()
    store.restore()
    assert [p.data_ptr() for p in params] == own and layout.weights_in_place()
    assert torch.equal(layout.weights, before)
