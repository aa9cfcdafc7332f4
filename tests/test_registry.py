"""Backend lookup, capability probes and the bring-your-own-kernel path."""

import pytest
import torch

from rlparity import RlparityError
from rlparity.attention import AVAILABLE, get_backend, registered_backends


def test_builtin_backends_are_registered():
    names = {backend.name for backend in registered_backends()}
    assert {"reference", "eager", "chunked", "flex"} <= names


def test_every_probe_answers_available_or_a_reason_without_raising():
    for backend in registered_backends():
        for device in (torch.device("cpu"), torch.device("cuda")):
            answer = backend.availability(device)
            assert isinstance(answer, str) and answer
            if answer != AVAILABLE:
                assert backend.name in answer or len(answer) > 20  # a reason a user can act on


def test_gpu_only_backend_names_the_fix_on_cpu():
    for backend in registered_backends():
        if backend.gpu_only:
            assert "CUDA" in backend.availability(torch.device("cpu"))


@pytest.mark.parametrize("target, message", [
    ("nope", "unknown attention backend 'nope'"),
    ("no_such_module_xyz:attend", "cannot import module 'no_such_module_xyz'"),
    ("rlparity.attention.chunked:no_such_fn", "has no attribute 'no_such_fn'"),
    ("rlparity.attention.chunked:BLOCK_K", "is not callable"),
    ("tests.planted_attention:wrong_signature", "expected signature attend(q, k, v, sinks"),
    ("rlparity.attention.chunked:", "expected 'module:attr'"),
])
def test_bad_backend_names_fail_with_the_reason(target, message):
    with pytest.raises(RlparityError, match=None) as info:
        get_backend(target)
    assert message in str(info.value)


def test_user_backend_runs_through_the_contract():
    backend = get_backend("rlparity.attention.chunked:attend")
    q = torch.randn(1, 2, 5, 8)
    out, lse = backend.attend(q, q, q, torch.zeros(2))
    assert out.shape == q.shape and lse.shape == (1, 2, 5)
