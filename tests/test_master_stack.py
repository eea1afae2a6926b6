"""model/master_stack.py: the stacked masters of FP8 training (CPU)."""
import torch
import torch.nn as nn

from model.master_stack import stacked_master


def _params(rows, cols=8, groups=3):
    return [[nn.Parameter(torch.randn(r, cols)) for r in rows] for _ in range(groups)]


def test_stack_values_and_gradients_match_torch_stack():
    owner = nn.Module()
    groups = _params([4, 4])
    expected_values = torch.stack([torch.cat([p.detach() for p in g]) for g in groups])
    ref = [[p.detach().clone().requires_grad_() for p in g] for g in groups]
    w = torch.randn_like(expected_values)
    (stacked_master(owner, "stack", groups) * w).sum().backward()
    (torch.stack([torch.cat(g) for g in ref]) * w).sum().backward()
    assert torch.equal(owner.stack, expected_values)
    for params, refs in zip(groups, ref):
        for p, r in zip(params, refs):
            assert torch.equal(p.grad, r.grad)


def test_params_are_slices_and_gradients_are_not_copied():
    owner = nn.Module()
    groups = _params([2, 6])
    out = stacked_master(owner, "stack", groups)
    assert out.data_ptr() == owner.stack.data_ptr()
    assert groups[1][1].data_ptr() == owner.stack[1, 2].data_ptr()
    grad = torch.randn_like(out)
    out.backward(grad)
    # The gradient's slices became the params' gradients: one buffer, no copy.
    assert groups[2][0].grad.data_ptr() == grad.data_ptr() + 2 * 8 * 8 * grad.element_size()
    # An optimizer step through the params is seen by the next call, without restacking.
    with torch.no_grad():
        groups[0][0].add_(1.0)
    stack = owner.stack
    assert torch.equal(stacked_master(owner, "stack", groups)[0, :2], groups[0][0].detach())
    assert owner.stack is stack


def test_restacks_when_a_param_moved():
    owner = nn.Module()
    groups = _params([4])
    stacked_master(owner, "stack", groups)
    groups[1][0].data = torch.full((4, 8), 3.0)  # e.g. a load that replaced the tensor
    out = stacked_master(owner, "stack", groups)
    assert torch.equal(out[1], torch.full((4, 8), 3.0))
    assert groups[1][0].data_ptr() == owner.stack[1].data_ptr()


def test_gradients_accumulate_over_two_backwards():
    owner = nn.Module()
    groups = _params([4])
    for _ in range(2):
        stacked_master(owner, "stack", groups).sum().backward()
    assert torch.equal(groups[0][0].grad, torch.full((4, 8), 2.0))
