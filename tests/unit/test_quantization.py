"""Weight-only quantized layers against their de-quantized weights, and GGUF's Q4_0/Q4_1/Q8_0 tensors as our
reader gives them against the `gguf` package's own de-quantization (a tiny file written here)."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from llamaserve.model.gguf import GGUFCheckpoint
from llamaserve.model.parallel import Linear
from llamaserve.model.quantization import GroupCodes, Int4Weight

IN, OUT = 192, 96


def layer(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    linear = Linear(IN, OUT)
    linear.weight.data.normal_(0, 0.05)
    return linear


def bf16_tolerance(x: torch.Tensor, weight: torch.Tensor) -> float:
    """The rounding of bfloat16 activations and outputs (the kernels' dtype on CPU), with margin."""
    return 4 * 2**-8 * (x.abs() @ weight.abs().T).max().item()


def test_int8_layer_logits_equal_its_dequantized_weight():
    linear, x = layer(), torch.randn(5, IN)
    original = linear.weight.detach().clone()
    linear.quantize("int8", 32)
    reference = linear.quantized.dequantize()  # [out, in] float32: q * the scales the kernel uses
    step = original.abs().amax(1, keepdim=True) / 127
    # Round to nearest, one scale a row; the kernel's scales are bfloat16 (a relative 2^-9 more).
    assert ((reference - original).abs() <= step / 2 * 1.01 + original.abs() * 2**-8).all()
    y = linear(x)
    assert y.dtype == torch.float32 and y.shape == (5, OUT)
    expected = x @ reference.T
    assert (y - expected).abs().max() < bf16_tolerance(x, reference)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_layer_logits_equal_its_dequantized_weight(group_size):
    linear, x = layer(1), torch.randn(5, IN)
    codes = GroupCodes.from_float(linear.weight.detach(), group_size)
    groups = linear.weight.detach().view(OUT, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # [out, groups]
    error = (codes.dequantize() - linear.weight.detach()).view(OUT, -1, group_size).abs()
    assert (error <= step.unsqueeze(-1) / 2 * 1.01).all()
    reference = Int4Weight.from_codes(codes, "cpu").dequantize(codes)  # bf16-rounded scales
    linear.quantize("int4", group_size)
    y = linear(x)
    assert (y - x @ reference.T).abs().max() < bf16_tolerance(x, reference)
    assert (y - x @ codes.dequantize().T).abs().max() < bf16_tolerance(x, reference)


def test_a_quantized_layer_keeps_its_dtype_for_adapters_and_frees_its_float_weight():
    linear = layer()
    linear.quantize("int4", 32)
    assert linear.weight.numel() == 0 and linear.weight.dtype == torch.float32
    bf16 = layer()
    bf16.weight.data = bf16.weight.data.bfloat16()
    bf16.quantize("int8", 32)
    assert bf16(torch.randn(3, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


QTYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


class Heads:
    num_attention_heads, num_key_value_heads = 4, 2


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """Tensors quantized by the `gguf` package (as llama.cpp does) in every type we load at its precision."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    weights = {}
    for i, qtype in enumerate(QTYPES):
        for name in (f"blk.{i}.ffn_down.weight", f"blk.{i}.attn_q.weight"):
            weights[name] = rng.normal(0, 0.05, (OUT, IN)).astype(np.float32)
            writer.add_tensor(name, gguf.quants.quantize(weights[name], qtype), raw_dtype=qtype)
    writer.add_tensor("output_norm.weight", rng.normal(1, 0.1, IN).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reverse_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' undoing of llama.cpp's rotary row order (modeling_gguf_pytorch_utils)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@pytest.mark.parametrize("index,qtype", list(enumerate(QTYPES)), ids=[q.name for q in QTYPES])
def test_gguf_tensors_read_as_the_gguf_package_dequantizes_them(gguf_file, index, qtype):
    checkpoint = GGUFCheckpoint(gguf_file, Heads)
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    for name, ours in ((f"blk.{index}.ffn_down.weight", f"model.layers.{index}.mlp.down_proj.weight"),
                       (f"blk.{index}.attn_q.weight", f"model.layers.{index}.self_attn.q_proj.weight")):
        expected = gguf.quants.dequantize(tensors[name].data, qtype)
        if "attn_q" in name:
            expected = reverse_permute(expected, Heads.num_attention_heads)
        expected = torch.from_numpy(np.ascontiguousarray(expected))
        assert checkpoint.shape(ours) == (OUT, IN)
        assert checkpoint.kind(ours) == ("int8" if qtype == GGMLQuantizationType.Q8_0 else "int4")
        assert torch.equal(checkpoint.read(ours), expected)
        assert torch.equal(checkpoint.read(ours, 0, 10, 50), expected[10:50])
        assert torch.equal(checkpoint.read(ours, 1, 64, 160), expected[:, 64:160])
        assert torch.equal(checkpoint.read(ours, 1, 5, 77), expected[:, 5:77])  # not on a block boundary
        if qtype == GGMLQuantizationType.Q8_0:
            with pytest.raises(ValueError, match="not Q4_0 or Q4_1"):
                checkpoint.read_codes(ours)
            continue
        # The 4-bit codes as they are: exactly the same weights, and slices of them.
        assert torch.equal(checkpoint.read_codes(ours).dequantize(), expected)
        assert torch.equal(checkpoint.read_codes(ours, 0, 10, 50).dequantize(), expected[10:50])
        assert torch.equal(checkpoint.read_codes(ours, 1, 64, 160).dequantize(), expected[:, 64:160])
        with pytest.raises(ValueError, match="blocks"):
            checkpoint.read_codes(ours, 1, 5, 77)
    assert checkpoint.kind("model.norm.weight") is None
    assert torch.equal(checkpoint.read("model.norm.weight"), torch.from_numpy(np.array(tensors["output_norm.weight"].data)))
