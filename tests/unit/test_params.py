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


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )


def test_batchnorm_statistics_travel_in_the_flat_vector_and_no_step_touches_them():
    """The layout is the parameters (3*4+4 + 4+4 + 4*2+2 = 34), then BatchNorm's running
    mean and variance (4 + 4 = 8): 42 elements, 34 trainable. Loading a vector sets the
    statistics too, so a client never inherits the previous client's. One SGD step on
    one batch (lr 0.1, weight decay 0.5) moves the weights, but the statistics only by
    BatchNorm's own update, running = 0.9 * running + 0.1 * (the batch's statistic): had
    the step touched them, weight decay would have taken 0.1 * 0.5 * running off."""
    from roost.algorithms.base import ClientContext, ClientOptimConfig
    from roost.algorithms.local_sgd import local_sgd
    from roost.data.base import ClientData

    module = _bn_net()
    layout = ParamLayout.of(module)
    assert (layout.numel, layout.trainable) == (42, 34)
    model = FlatModel(module)
    start = model.params.clone()
    start[34:38] = 5.0  # a previous client's running mean...
    model.load_(start)
    assert torch.equal(module[1].running_mean, torch.full((4,), 5.0))  # ...is what it sees
    start[34:38] = 0.0
    model.load_(start)  # the next client's payload resets it

    torch.manual_seed(1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with torch.no_grad():  # the BN input before the step
        batch_mean = module[0](x).mean(0)
        batch_var = module[0](x).var(0, unbiased=True)
    cfg = ClientOptimConfig(lr=0.1, batch_size=8, weight_decay=0.5, shuffle=False)
    ctx = ClientContext(0, 1, 0, 8, torch.Generator())
    local_sgd(ctx, model, ClientData(x, y), cfg)
    assert not torch.equal(model.params[:34], start[:34])  # the weights moved
    torch.testing.assert_close(model.params[34:38], 0.1 * batch_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.params[38:42], 0.9 * start[38:42] + 0.1 * batch_var)


def test_fedavg_averages_the_batchnorm_statistics():
    """Two clients' flat results, BN tail included, averaged with weights 1 and 3."""
    from roost.algorithms.base import ClientResult, Contribution
    from roost.algorithms.fedavg import FedAvgStrategy

    a, b = torch.zeros(42), torch.ones(42)
    a[34:], b[34:] = 2.0, 6.0
    total = Contribution()
    total.fold(ClientResult({"params": a}, 1.0), 0)
    total.fold(ClientResult({"params": b}, 3.0), 1)
    strategy = FedAvgStrategy()
    strategy.initialize(torch.zeros(42))
    strategy.step(1, [total])
    assert torch.equal(strategy.params[34:], torch.full((8,), 5.0))  # (2 + 3 * 6) / 4
    assert torch.equal(strategy.params[:34], torch.full((34,), 0.75))


def test_train_mode_sets_every_flag_and_skips_the_walk_when_they_are_set():
    """After an evaluation (or any child put in eval mode) every submodule trains again;
    when all already train, ``module.train()`` (a walk through nn.Module.__setattr__ per
    submodule) is not called at all."""
    module = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(3)))
    model = FlatModel(module)
    calls = []
    real_train = module.train
    module.train = lambda mode=True: calls.append(mode) or real_train(mode)  # type: ignore[method-assign]
    module[2][0].eval()  # one nested child only
    model.train_mode()
    assert calls == [True]
    assert all(m.training for m in module.modules())
    model.train_mode()
    assert calls == [True]  # nothing to change: skipped
    module.eval()
    model.train_mode()
    # module.eval() is module.train(False), then train_mode's own module.train(True)
    assert calls == [True, False, True] and all(m.training for m in module.modules())
