"""The live-tensor tracker counts what is allocated and freed, by phase and by module, on cpu and meta."""

import pytest
import torch

from rlparity.errors import RlparityError
from rlparity.memory import TrackedMeter, meter_for
from rlparity.memory.report import GRADIENTS, INPUTS, OPTIMIZER_STATE, WEIGHTS

FLOAT32 = 4


def test_counts_new_storages_until_they_die():
    with TrackedMeter() as meter:
        a = torch.empty(1000)
        assert meter.current == 1000 * FLOAT32
        b = a.view(10, 100)[2:5]  # views share the storage
        a.add_(1.0)  # in place: no new storage
        assert meter.current == 1000 * FLOAT32
        c = a * 2
        assert meter.current == 2000 * FLOAT32
        del a, b
        assert meter.current == 1000 * FLOAT32
        del c
        assert meter.current == 0
    assert meter.report().peak == 2000 * FLOAT32


def test_tensors_from_before_the_region_are_ignored_unless_adopted():
    before = torch.empty(500)
    with TrackedMeter() as meter:
        before.mul_(2.0)
        _ = before[:10]
        assert meter.current == 0
        meter.adopt([before, before[:3]], WEIGHTS)  # one storage, counted once
        assert meter.current == 500 * FLOAT32
    assert meter.report().at_peak == {WEIGHTS: 500 * FLOAT32}


def test_phase_peaks_and_end_of_phase_categories():
    with TrackedMeter() as meter:
        with meter.phase("forward"):
            kept = torch.empty(100)
            transient = torch.empty(300)
            del transient
        with meter.phase("backward"):
            grad = torch.empty(50)
    report = meter.report()
    assert report.phase_peak == {"forward": 400 * FLOAT32, "backward": 150 * FLOAT32}
    assert report.end_of["forward"] == {"activations.other": 100 * FLOAT32}
    assert report.end_of["backward"] == {"activations.other": 100 * FLOAT32, "backward.other": 50 * FLOAT32}
    assert report.category_peak["activations.other"] == 400 * FLOAT32
    del kept, grad


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _kinds(name, module):
    return {"first": "alpha", "second": "beta"}.get(name)


def test_forward_and_backward_are_attributed_to_modules_and_gradients_relabelled():
    model = _Block()
    x = torch.randn(32, 8)
    with TrackedMeter() as meter, meter.watch(model, _kinds):
        meter.adopt(model.parameters(), WEIGHTS)
        meter.adopt([x], INPUTS)
        with meter.phase("forward"):
            loss = model(x).square().sum()
        with meter.phase("backward"):
            loss.backward()
    report = meter.report()
    # relu keeps its output (made outside both modules) for its backward, and second's matmul keeps it as its
    # input; square keeps second's output; the loss is held by the test. first's output is no one's saved tensor.
    assert report.saved_activations() == {"other": 32 * 16 * FLOAT32 + FLOAT32, "beta": 32 * 4 * FLOAT32}
    parameters = sum(p.numel() for p in model.parameters()) * FLOAT32
    assert report.end_of["backward"][GRADIENTS] == parameters
    assert report.category_peak["backward.alpha"] > 0 and report.category_peak["backward.beta"] > 0


def test_meta_tensors_are_counted_like_cpu_ones():
    sizes = {}
    for device in ("cpu", "meta"):
        with TrackedMeter(device) as meter:
            x = torch.empty(64, 32, device=device, requires_grad=True)
            w = torch.empty(32, 128, device=device, requires_grad=True)
            with meter.phase("forward"):
                y = (x @ w).relu().sum()
            with meter.phase("backward"):
                y.backward()
        sizes[device] = meter.report()
        assert sizes[device].meter == f"{device}-tracked"
    assert sizes["cpu"].phase_peak == sizes["meta"].phase_peak
    assert sizes["cpu"].phase_peak["forward"] > 0


def test_resize_grows_a_tracked_storage():
    with TrackedMeter() as meter:
        a = torch.empty(10)
        a.resize_(1000)
        assert meter.current == 1000 * FLOAT32
        del a


def test_optimizer_state_is_what_the_step_keeps():
    parameter = torch.nn.Parameter(torch.randn(256))
    optimizer = torch.optim.AdamW([parameter], foreach=False)
    parameter.grad = torch.randn(256)
    with TrackedMeter() as meter:
        with meter.phase("optimizer"):
            optimizer.step()
    state = meter.report().end_of["optimizer"][OPTIMIZER_STATE]
    # exp_avg and exp_avg_sq; the step count is made by torch.tensor(), which the dispatch mode does not see
    assert state == 2 * 256 * FLOAT32


def test_meter_for_picks_the_meter_by_device():
    assert isinstance(meter_for("cpu"), TrackedMeter)
    assert isinstance(meter_for("meta"), TrackedMeter)
    if not torch.cuda.is_available():
        with pytest.raises(RlparityError, match="needs a visible CUDA device"):
            meter_for("cuda")
