"""The choice between the fused CUDA kernels and our PyTorch code (twotower.kernels): on CPU, and
where the kernels' packages are not installed, ours run, with results equal to the plain functions.
(The kernels themselves are compared with ours on CUDA by benchmarks/gpu_check.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import randomize, tiny_config
from twotower import kernels
from twotower.conv import causal_conv, causal_conv_step
from twotower.mamba2 import Mamba2Mixer
from twotower.ssd import ssd_chunked, ssd_step


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("operation", sorted(kernels.MAMBA_KERNELS))
def test_an_absent_package_means_ours(operation):
    module, _ = kernels.MAMBA_KERNELS[operation]
    if _installed(module):
        pytest.skip(f"{module} is installed here")
    assert kernels.kernel_for(operation) is None
    assert kernels.kernels_available()[operation] is False


def test_cpu_tensors_run_ours_and_no_kernel():
    torch.manual_seed(0)
    mixer = randomize(Mamba2Mixer(tiny_config()).eval())
    u = torch.randn(2, 11, 32)
    calls = dict(kernels.kernel_calls)
    for operation in kernels.MAMBA_KERNELS:
        assert kernels.kernel_or_ours(operation, u) == "ours"
        with kernels.use_kernels(False):
            assert kernels.kernel_or_ours(operation, u) == "ours"
    with torch.no_grad():
        out, state = mixer(u)
        step_out, _ = mixer(u[:, :1], state)
        whole, _ = mixer(torch.cat([u, u[:, :1]], dim=1))
    assert dict(kernels.kernel_calls) == calls  # nothing ran a kernel
    torch.testing.assert_close(step_out[:, 0], whole[:, -1], atol=1e-5, rtol=1e-5)


def test_use_kernels_restores_the_previous_setting():
    with kernels.use_kernels(False):
        with kernels.use_kernels(True):
            assert kernels._enabled
        assert not kernels._enabled
    assert kernels._enabled


def test_dispatched_functions_equal_ours_on_cpu():
    g = torch.Generator().manual_seed(1)
    b, l, c, k, h, p, gr, n = 2, 9, 16, 4, 4, 8, 2, 16
    x = torch.randn(b, l, c, generator=g)
    weight, bias, history = torch.randn(c, k, generator=g), torch.randn(c, generator=g), torch.randn(b, c, k - 1, generator=g)
    for got, want in zip(kernels.mamba_conv(x, weight, bias, history), causal_conv(x, weight, bias, history)):
        assert torch.equal(got, want)
    for got, want in zip(kernels.mamba_conv_step(x[:, 0], weight, bias, history),
                         causal_conv_step(x[:, 0], weight, bias, history)):
        assert torch.equal(got, want)
    # one step of the sequence conv is the step
    seq_out, seq_history = causal_conv(x[:, :1], weight, bias, history)
    step_out, step_history = causal_conv_step(x[:, 0], weight, bias, history)
    torch.testing.assert_close(step_out, seq_out[:, 0], atol=1e-6, rtol=1e-6)
    assert torch.equal(step_history, seq_history)

    xs, dt = torch.randn(b, l, h, p, generator=g), torch.rand(b, l, h, generator=g) * 0.2
    A, B, C = -torch.rand(h, generator=g) * 4, torch.randn(b, l, gr, n, generator=g), torch.randn(b, l, gr, n, generator=g)
    state = torch.randn(b, h, p, n, generator=g)
    y, final = kernels.mamba_scan(xs, dt, A, B, C, 4, state)
    y_ref, final_ref = ssd_chunked(xs, dt, A, B, C, 4, state)
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)
    y_only, none = kernels.mamba_scan(xs, dt, A, B, C, 4, state, final_state=False)
    assert none is None and torch.equal(y_only, y_ref)
    for got, want in zip(kernels.mamba_scan_step(state, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0]),
                         ssd_step(state, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("length", [1, 2, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_ours_on_the_device(device, length, dtype):
    """Run by gpu_check (TWOTOWER_TEST_DEVICE=cuda) where causal-conv1d or mamba-ssm is installed:
    each kernel against ours, at lengths below, around and above the conv width and the chunk."""
    if device.type != "cuda" or not any(kernels.kernels_available().values()):
        pytest.skip("needs TWOTOWER_TEST_DEVICE=cuda and causal-conv1d or mamba-ssm installed")
    g = torch.Generator().manual_seed(length)
    b, c, k, h, p, gr, n = 2, 96, 4, 4, 16, 2, 16

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x, history = rand(b, length, c).to(dtype), rand(b, c, k - 1).to(dtype)
    weight, bias = rand(c, k).to(dtype), rand(c).to(dtype)
    xs, dt = rand(b, length, h, p), rand(b, length, h).abs() * 0.1
    A, B, C, state = -rand(h).abs() * 2, rand(b, length, gr, n), rand(b, length, gr, n), rand(b, h, p, n, scale=10)
    cases = [(kernels.mamba_conv, (x, weight, bias, None)), (kernels.mamba_conv, (x, weight, bias, history)),
             (kernels.mamba_conv_step, (x[:, 0], weight, bias, history)),
             (kernels.mamba_conv_step, (x[:, 0], weight, None, history)),
             (kernels.mamba_scan, (xs, dt, A, B, C, 16, None)), (kernels.mamba_scan, (xs, dt, A, B, C, 16, state)),
             (kernels.mamba_scan, (xs, dt, A, B, C, 16, state, False)),
             (kernels.mamba_scan_step, (state, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0]))]
    before = sum(kernels.kernel_calls.values())
    with torch.no_grad():
        for fn, args in cases:
            with kernels.use_kernels(True):
                fused = fn(*args)
            with kernels.use_kernels(False):
                ours = fn(*args)
            for got, want in zip(fused, ours):
                if want is None:
                    assert got is None
                    continue
                assert got.dtype == want.dtype and got.shape == want.shape, fn.__name__
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=fn.__name__)
    assert sum(kernels.kernel_calls.values()) > before  # some kernel ran
