"""llamaserve's own bfloat16 matmul kernel (model/csrc/gemm_bf16.c) against float32 arithmetic on the same
bfloat16 values, through the layer that serves it, and the fallback where it cannot be built."""

import logging
import os
import stat

import pytest
import torch

from llamaserve.model import cpu_kernels
from llamaserve.model.parallel import Linear


@pytest.fixture(scope="module")
def gemm(tmp_path_factory):
    kernel = cpu_kernels.bf16_gemm(tmp_path_factory.mktemp("cache"))
    if kernel is None:
        pytest.skip("this CPU or machine cannot run the AVX-512 BF16 kernel (the layers keep oneDNN)")
    return kernel


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # float32 sums of the bf16 products
    return x.float() @ weight.float().T


def close(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal up to the bfloat16 rounding of the output (float32 sums in another order: far smaller)."""
    expected = reference(x, weight)
    bound = 2**-8 * expected.abs() + 1e-5 * (x.float().abs() @ weight.float().abs().T)
    return bool(((y.float() - expected).abs() <= bound).all())


@pytest.mark.parametrize("n,k", [(16, 2), (48, 6), (64, 576), (80, 34), (960, 576), (576, 1536), (208, 96)])
def test_pack_is_a_permutation_and_matmul_matches(gemm, n, k):
    torch.manual_seed(n * k)
    weight = torch.randn(n, k).bfloat16()
    packed = gemm.pack(weight)
    assert packed.shape == weight.shape
    assert k == 2 or not torch.equal(packed, weight)  # one pair per row: the layouts coincide
    assert torch.equal(gemm.unpack(packed), weight)
    for m in (1, 2, 5, 6, 7, 13, 64):
        x = torch.randn(m, k).bfloat16()
        y = gemm.matmul(x, packed)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert close(y, x, weight), (m, n, k)


def test_a_row_does_not_depend_on_its_neighbours(gemm):
    """Batch invariance: the same row alone, first, last or in the middle of any batch gives the same bits."""
    torch.manual_seed(1)
    weight, x = torch.randn(960, 576).bfloat16(), torch.randn(1, 576).bfloat16()
    packed = gemm.pack(weight)
    alone = gemm.matmul(x, packed)
    for m in (2, 6, 7, 16, 63):
        others = torch.randn(m, 576).bfloat16()
        for at in (0, m // 2, m):
            batch = torch.cat([others[:at], x, others[at:]])
            assert torch.equal(gemm.matmul(batch, packed)[at], alone[0]), (m, at)


def test_strided_and_float32_inputs(gemm):
    torch.manual_seed(2)
    weight = torch.randn(64, 96).bfloat16()
    packed = gemm.pack(weight)
    wide = torch.randn(5, 200).bfloat16()
    view = wide[:, 40:136]  # rows 200 apart: read in place
    assert torch.equal(gemm.matmul(view, packed), gemm.matmul(view.contiguous(), packed))
    x32 = torch.randn(3, 96)
    assert torch.equal(gemm.matmul(x32, packed), gemm.matmul(x32.bfloat16(), packed))
    assert gemm.matmul(torch.empty(0, 96).bfloat16(), packed).shape == (0, 64)


def test_linear_layer_serves_through_the_kernel(gemm):
    torch.manual_seed(3)
    ours, theirs = Linear(576, 960), Linear(576, 960)
    ours.weight.data = torch.randn(960, 576).bfloat16()
    theirs.weight.data = ours.weight.data.clone()
    weight = ours.weight.detach().clone()
    ours.pack_for_cpu(gemm)
    theirs.pack_for_cpu()  # oneDNN
    assert ours.gemm is gemm and not ours.packed and theirs.packed and theirs.gemm is None
    odd = Linear(576, 24)  # 24 output rows: not a multiple of 16, so oneDNN
    odd.weight.data = torch.randn(24, 576).bfloat16()
    odd.pack_for_cpu(gemm)
    assert odd.gemm is None and odd.packed
    for m in (1, 3, 17):
        x = torch.randn(m, 576).bfloat16()
        assert close(ours(x), x, weight)
        assert close(theirs(x), x, weight)  # the two kernels agree up to rounding


def test_no_compiler_means_onednn_and_a_log_line(tmp_path, monkeypatch, caplog):
    """A C compiler that fails (or none at all) leaves the layers on oneDNN; the server still loads."""
    fake = tmp_path / "bin" / "cc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: cpu_kernels.BF16_CPU_FLAGS)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.bf16_gemm(tmp_path / "cache") is None
    assert "oneDNN" in caplog.text and "failed" in caplog.text
    monkeypatch.setattr(cpu_kernels, "cpu_flags", set)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.bf16_gemm(tmp_path / "other") is None
    assert "the CPU lacks avx512_bf16" in caplog.text


def test_a_built_kernel_is_reused(gemm, tmp_path):
    first = cpu_kernels.build("gemm_bf16.c", cpu_kernels.BF16_FLAGS, tmp_path)
    (library,) = (tmp_path / "kernels").glob("*/gemm_bf16.so")
    built = library.stat().st_mtime_ns
    cpu_kernels.build("gemm_bf16.c", cpu_kernels.BF16_FLAGS, tmp_path)
    assert library.stat().st_mtime_ns == built and first is not None
