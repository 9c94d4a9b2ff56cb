"""The flat parameter layout: views, not copies; gradients accumulate in place."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roost.params import FlatModel, ParamLayout


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_layout_offsets_cover_every_parameter_once():
    layout = ParamLayout.of(_net())
    # 3*4 + 4 + 4*2 + 2 = 26 parameters, laid out in named_parameters order.
    assert layout.numel == 26
    assert [s.offset for s in layout.slots] == [0, 12, 16, 24]
    assert layout.nbytes == 104


def test_flat_model_keeps_values_and_views_module_tensors():
    reference = _net()
    flat = FlatModel(_net())
    for (name, p), (_, q) in zip(
        flat.module.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    flat.params.fill_(0.5)  # writing the flat vector is seen by the module
    assert all(bool((p == 0.5).all()) for p in flat.module.parameters())


def test_gradients_accumulate_into_the_flat_buffer_across_steps():
    flat = FlatModel(_net())
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    for _ in range(3):
        flat.zero_grad_()
        F.cross_entropy(flat.module(x), y).backward()
        assert flat.check_grads_bound()
    expected = torch.autograd.grad(
        F.cross_entropy(flat.module(x), y), list(flat.module.parameters())
    )
    assert torch.equal(flat.grads, torch.cat([g.reshape(-1) for g in expected]))


def test_load_is_in_place_and_flatten_round_trips():
    flat = FlatModel(_net())
    ptr = flat.params.data_ptr()
    new = torch.arange(26, dtype=torch.float32)
    flat.load_(new)
    assert flat.params.data_ptr() == ptr
    state = {k: v.clone() for k, v in flat.module.state_dict().items()}
    assert torch.equal(flat.layout.flatten(state), new)


def test_loading_the_resident_vector_into_itself_is_refused():
    # Client updates read the payload (an anchor) while training the model in place, so
    # a payload that *is* the resident vector would silently become the trained weights.
    flat = FlatModel(_net())
    with pytest.raises(ValueError, match="aliases the resident model"):
        flat.load_(flat.params)


def test_flatten_and_load_carry_no_autograd_history():
    # flattening a module's own parameters (how w^0 is made) gave a tensor with a grad_fn;
    # loading it made the resident model a non-leaf, and FedProx/Ditto's in-place
    # corrections then failed ("functions with out=... don't support autograd")
    module = nn.Linear(3, 2)
    flat = ParamLayout.of(module).flatten(dict(module.named_parameters()))
    assert not flat.requires_grad and flat.grad_fn is None
    model = FlatModel(nn.Linear(3, 2))
    model.load_(torch.ones(8, requires_grad=True) * 2)
    assert model.params.grad_fn is None
    assert torch.equal(model.params.detach(), torch.full((8,), 2.0))
