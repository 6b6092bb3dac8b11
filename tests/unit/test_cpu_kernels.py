"""llamaserve's own matmul kernels (model/csrc/gemm_bf16.c, gemm_int8.c, gemm_int4.c) against float32 arithmetic on the same
bfloat16 values (int4: on the weight they de-quantize to), through the layers that serve them, and the fallback
where they cannot be built."""

import logging
import os
import shutil
import stat

import pytest
import torch

from llamaserve.model import cpu_kernels
from llamaserve.model.parallel import Linear
from llamaserve.model.quantization import GroupCodes, Int4KernelWeight, Int4Weight, Int8KernelWeight, Int8Weight
from tests.conftest import built_kernel


@pytest.fixture(scope="module")
def gemm(tmp_path_factory):
    return built_kernel(cpu_kernels.bf16_gemm, tmp_path_factory.mktemp("cache"))


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # float32 sums of the bf16 products
    return x.float() @ weight.float().T


def close(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, x_step: float = 0) -> bool:
    """Equal up to the bfloat16 rounding of the output (float32 sums in another order: far smaller), and, where
    the kernel rounds x to a grid of `x_step` times each row's largest |x| (int8's int16), that rounding."""
    expected = reference(x, weight)
    rounding = x_step / 2 * x.float().abs().amax(1, keepdim=True) * weight.float().abs().sum(1)
    bound = 2**-8 * expected.abs() + 1e-5 * (x.float().abs() @ weight.float().abs().T) + rounding
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
    assert "unavailable" in caplog.text and "failed" in caplog.text
    monkeypatch.setattr(cpu_kernels, "cpu_flags", set)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.bf16_gemm(tmp_path / "other") is None
    assert "the CPU lacks avx512_bf16" in caplog.text


@pytest.mark.parametrize("source", sorted(cpu_kernels.BUILDS))
def test_every_kernel_compiles(source, tmp_path):
    """Compiling needs no CPU with the instructions: where a C compiler exists, every source must build (a kernel
    that fails to build at run time falls back to torch's quietly, and the tests that need it skip)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    how = cpu_kernels.BUILDS[source]
    try:
        cpu_kernels.build(source, how.flags, tmp_path, how.libs)
    except OSError:  # built, but this CPU or loader cannot load it
        pass
    assert list((tmp_path / "kernels").glob(f"*/{source.removesuffix('.c')}.so"))


def test_a_built_kernel_is_reused(gemm, tmp_path):
    first = cpu_kernels.build("gemm_bf16.c", cpu_kernels.BF16_FLAGS, tmp_path)
    (library,) = (tmp_path / "kernels").glob("*/gemm_bf16.so")
    built = library.stat().st_mtime_ns
    cpu_kernels.build("gemm_bf16.c", cpu_kernels.BF16_FLAGS, tmp_path)
    assert library.stat().st_mtime_ns == built and first is not None


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    return built_kernel(cpu_kernels.int4_gemm, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (48, 64, 32), (960, 576, 32), (576, 1536, 32), (80, 256, 64),
                                       (64, 256, 128), (208, 96, 2)])
def test_int4_kernel_matches_its_dequantized_weight(int4, n, k, group):
    torch.manual_seed(n + k)
    codes = GroupCodes.from_float(torch.randn(n, k) * 0.05, group)
    weight = Int4KernelWeight(int4, codes)
    reference = weight.dequantize(codes)  # q * scale + min, both rounded to bfloat16 as the kernel holds them
    for m in (1, 2, 3, 4, 7, 64):
        x = torch.randn(m, k).bfloat16()
        y = weight.matmul(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert close(y, x, reference), (m, n, k, group)
    x32 = torch.randn(5, k)
    assert weight.matmul(x32).dtype == torch.float32  # a float32 model's layer: bfloat16 inside, float32 out


def test_int4_rows_do_not_depend_on_their_neighbours(int4):
    torch.manual_seed(4)
    weight = Int4KernelWeight(int4, GroupCodes.from_float(torch.randn(960, 576) * 0.05, 32))
    x = torch.randn(1, 576).bfloat16()
    alone = weight.matmul(x)
    for m in (2, 3, 4, 16, 65):
        others = torch.randn(m, 576).bfloat16()
        for at in (0, m // 2, m):
            assert torch.equal(weight.matmul(torch.cat([others[:at], x, others[at:]]))[at], alone[0]), (m, at)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    return built_kernel(cpu_kernels.int8_gemm, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("n,k", [(16, 3), (48, 64), (960, 576), (576, 1536), (80, 100), (49152 // 64, 576)])
def test_int8_kernel_matches_its_dequantized_weight(int8, n, k):
    torch.manual_seed(n + k)
    theirs = Int8Weight.quantize(torch.randn(n, k) * 0.05, torch.bfloat16)
    ours = Int8KernelWeight(int8, theirs)
    reference = theirs.dequantize()
    assert torch.equal(ours.dequantize(), reference)  # the layout holds the same codes and scales
    for m in (1, 2, 5, 6, 7, 64):
        x = torch.randn(m, k).bfloat16()
        y = ours.matmul(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert close(y, x, reference, x_step=1 / 32767), (m, n, k)  # x in int16 per group
    alone = ours.matmul(x[:1])
    assert torch.equal(ours.matmul(torch.cat([torch.randn(4, k).bfloat16(), x[:1]]))[4], alone[0])  # batch invariant


@pytest.mark.parametrize("kind, theirs_type, ours_type, tolerance", [
    ("int4", Int4Weight, Int4KernelWeight, 0.02),  # bf16 scales: zero vs minimum
    ("int8", Int8Weight, Int8KernelWeight, 0.01),
])
def test_linear_quantizes_onto_the_kernel(request, kind, theirs_type, ours_type, tolerance):
    """A layer quantizes onto llamaserve's kernel where it is given, else torch's, and both agree (every shape
    torch's int4 CPU kernel takes, out % 16 == 0, ours takes too)."""
    torch.manual_seed(5)
    ours, theirs = Linear(64, 96), Linear(64, 96)
    ours.weight.data.normal_(0, 0.05)
    theirs.weight.data = ours.weight.data.clone()
    kernel = request.getfixturevalue(kind)  # the int4 or int8 fixture
    ours.quantize(kind, 32, cpu_kernels.CpuKernels(**{kind: kernel}))
    theirs.quantize(kind, 32)
    assert isinstance(ours.quantized, ours_type) and isinstance(theirs.quantized, theirs_type)
    x = torch.randn(3, 64)
    assert (ours(x) - theirs(x)).abs().max() <= tolerance * theirs(x).abs().max()


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    return built_kernel(cpu_kernels.layer_ops, tmp_path_factory.mktemp("cache"))


def ulp_close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> bool:
    """Within one rounding step of the dtype (the float32 sums run in another order than torch's)."""
    step = 2**-7 if dtype == torch.bfloat16 else 2**-20
    return bool(((ours.float() - theirs.float()).abs() <= step * theirs.float().abs() + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_activation_match_torch(ops, dtype):
    torch.manual_seed(7)
    for rows in (1, 3, 17):
        x, delta = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
        weight = (torch.rand(576) + 0.5).to(dtype)
        expected_x = x + delta
        expected = torch.nn.functional.rms_norm(expected_x, (576,), None, 1e-5) * weight
        ours_x = x.clone()
        out = ops.add_rms_norm(ours_x, delta, weight, 1e-5)
        assert torch.equal(ours_x, expected_x)  # the residual add, rounded as torch rounds it
        assert ulp_close(out, expected, dtype)
        alone = ops.add_rms_norm(x[:1].clone(), delta[:1], weight, 1e-5)
        assert torch.equal(alone[0], out[0])  # a row never depends on the others
        assert ulp_close(ops.add_rms_norm(x.clone(), None, weight, 1e-5),
                         torch.nn.functional.rms_norm(x, (576,), None, 1e-5) * weight, dtype)
        gate_up = torch.randn(rows, 2 * 1536).to(dtype)
        gate, up = gate_up.split(1536, dim=-1)
        assert ulp_close(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_matches_torch(ops, dtype):
    from llamaserve.model.architecture import ModelArchitecture
    from llamaserve.model.rotary import RotaryEmbedding, apply_rotary

    arch = ModelArchitecture(vocab_size=256, hidden_size=64 * 9, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)
    positions = torch.tensor([0, 5, 17, 1000, 2047])
    cos, sin = RotaryEmbedding(arch)(positions, None, dtype)
    heads = torch.randn(5, 9 + 2 * 3, 64).to(dtype)
    expected = apply_rotary(heads[:, :12], cos, sin)
    ours = heads.clone()
    ops.rotary(ours, 12, cos, sin)
    assert torch.equal(ours[:, 12:], heads[:, 12:])  # v untouched
    assert ulp_close(ours[:, :12], expected, dtype)
