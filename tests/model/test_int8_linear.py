"""Int8Linear, quantize_model / restore_linears, safetensors round trip."""
import math

import pytest
import torch
from torch import nn

from tiled_diffusion import reference
from tiled_diffusion.model.int8 import (Int8Embedding, Int8Linear, PIXART_KEEP_HIGH_PRECISION, int8_state_dict,
                                   load_quantized, quantize_model, restore_linears, save_quantized)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - out).pow(2).sum().item())


def outlier_activations(m: int, k: int) -> torch.Tensor:
    """Activations like a transformer's: mostly N(0,1) with a few channels 20x larger."""
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[: max(1, k // 64)]] *= 20.0
    return x


@pytest.mark.parametrize("shape", [(1, 64, 32), (37, 129, 67), (256, 1152, 1152)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_w8a8_matches_reference_composition(shape, bias):
    m, k, n = shape
    lin = nn.Linear(k, n, bias=bias)
    q = Int8Linear.from_linear(lin, "w8a8")
    x = outlier_activations(m, k)
    xi, xs = reference.quantize_per_token(x)
    wi, ws = reference.quantize_per_token(lin.weight.detach())
    expected = reference.int8_gemm(xi, xs, wi, ws, None if lin.bias is None else lin.bias.detach(), torch.float32)
    out = q(x)
    # Same integers, same scales: only the fp32 epilogue rounding differs from the fp64 reference.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_sqnr_vs_float_linear(dtype):
    lin = nn.Linear(1152, 1152)
    x = outlier_activations(512, 1152)
    ref = lin(x)
    out = Int8Linear.from_linear(lin.to(dtype), "w8a8")(x.to(dtype))
    assert out.dtype == dtype
    db = sqnr_db(ref, out.float())
    print(f"W8A8 SQNR vs fp32 Linear ({dtype}): {db:.1f} dB")
    assert db >= 28.0


def test_w8a16_is_dequantized_linear():
    lin = nn.Linear(96, 40)
    q = Int8Linear.from_linear(lin, "w8a16")
    x = torch.randn(3, 5, 96)
    expected = nn.functional.linear(x, q.dequantized_weight(torch.float32), lin.bias)
    torch.testing.assert_close(q(x), expected)
    assert sqnr_db(lin(x), q(x)) > 35  # weight-only int8 per channel keeps ~40 dB on Gaussian weights


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_w8a16_fp16_large_outputs_do_not_overflow(bias):
    """Issue 21 defect 2: outputs of a few hundred are 1/scale ~ 10^3 times larger as raw int8 products, past
    fp16's 65504. Bound: the fp16 dequantized weight is off by <= 2^-11 relative per element (sum <= 2^-11·|x|·|w|),
    the output rounding <= 2^-11·|y|; fp32 accumulation (K·2^-24 relative) is far below both. 1.5x margin."""
    torch.manual_seed(4)
    lin = nn.Linear(517, 67, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    q = Int8Linear.from_linear(lin.half(), "w8a16")  # an fp16 model's layer (an fp32 one computes in fp32)
    w = q.dequantized_weight(torch.float64)
    x = (3 * torch.randn(9, 517) + 20 * torch.sign(w[:9])).half()  # rows aligned with a weight row: big outputs
    ref = x.double() @ w.T + (lin.bias.detach().double() if bias else 0)
    raw = (x.double() @ q.weight.double().T).abs().max().item()
    assert raw > 65504 and ref.abs().max() > 100  # the case the old path overflowed on, with a representable y
    out = q(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    bound = 2.0 ** -11 * (x.double().abs() @ w.abs().T + ref.abs())
    assert ((out.double() - ref).abs() <= 1.5 * bound + 1e-6).all()


def test_w8a16_keeps_transformers_fp32_layers_in_fp32():
    """Issue 21 defect 2, T5's half: transformers keeps `wo` in fp32 under fp16 (its outputs overflow fp16) and
    casts wo's input to wo.weight.dtype only when that is not int8; the int8 wo must compute in fp32 itself. A tiny
    T5 in fp16 with `wo` fp32 and scaled so its output exceeds fp16's range: the int8 model must equal the float
    model built from the same dequantized weights (same roundings: identical up to fp32 summation order)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=97, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(5)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("DenseReluDense.wo"):
                m.weight.mul_(3e4)  # wo outputs ~1e5-1e6: only fp32 holds them
    model.half()
    for name, m in model.named_modules():  # what from_pretrained(dtype=fp16) does with _keep_in_fp32_modules
        if name.endswith("DenseReluDense.wo"):
            m.float()
    ids = torch.randint(0, 97, (2, 11))
    quantize_model(model, mode="w8a16")
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, Int8Linear)
    ref = T5EncoderModel(cfg).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "weight_scale" not in k}, strict=False)
    ref.half()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            keep = name.endswith("DenseReluDense.wo")
            ref.get_submodule(name).to(torch.float32 if keep else torch.float16).weight.data.copy_(
                m.dequantized_weight(torch.float32 if keep else torch.float16))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
        expected = ref(input_ids=ids).last_hidden_state
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-3, atol=2e-3)
    assert wo.float_dtype_probe.dtype == torch.float32
    # .half() moves the probe like a float weight: then the layer computes in fp16 like an fp16 nn.Linear
    assert wo.half().float_dtype_probe.dtype == torch.float16

def test_leading_dims_and_feature_check():
    q = Int8Linear.from_linear(nn.Linear(16, 8), "w8a8")
    assert q(torch.randn(2, 3, 16)).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="expects 16"):
        q(torch.randn(2, 15))
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(4, 4, mode="w4a4")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.proj_out = nn.Linear(32, 8)


def test_quantize_model_table_and_restore():
    torch.manual_seed(1)
    model = Block()
    keys_before = set(model.state_dict())
    x = torch.randn(4, 32)
    ref = model.ff(model.attn(x))
    swapped = quantize_model(model, mode="w8a8", exclude=("proj_out",))
    assert sorted(swapped) == ["attn", "ff.0", "ff.2"]
    assert type(model.proj_out) is nn.Linear and isinstance(model.attn, Int8Linear)
    assert set(model.state_dict()) == keys_before  # the float layers' keys (issue 22): plain torch reloads it
    with int8_state_dict():
        assert set(model.state_dict()) == keys_before | {"attn.weight_scale", "ff.0.weight_scale",
                                                         "ff.2.weight_scale"}
    assert sqnr_db(ref, model.ff(model.attn(x))) > 25
    restored = restore_linears(model)
    assert sorted(restored) == sorted(swapped)
    assert all(type(m) is not Int8Linear for m in model.modules())
    assert set(model.state_dict()) == keys_before


def test_pixart_defaults_keep_sensitive_layers():
    from tiled_diffusion.model.int8 import _matches

    for name in ["adaln_single.linear", "caption_projection.linear_1", "proj_out",
                 "adaln_single.emb.timestep_embedder.linear_1", "pos_embed.proj"]:
        assert _matches(name, PIXART_KEEP_HIGH_PRECISION), name
    for name in ["transformer_blocks.0.attn1.to_q", "transformer_blocks.27.ff.net.2"]:
        assert not _matches(name, PIXART_KEEP_HIGH_PRECISION), name


def test_safetensors_round_trip_and_float_checkpoint(tmp_path):
    model = Block()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model)
    path = str(tmp_path / "q.safetensors")
    save_quantized(model, path)
    other = Block()
    quantize_model(other)
    load_quantized(other, path)
    x = torch.randn(3, 32)
    torch.testing.assert_close(other.attn(x), model.attn(x), rtol=0, atol=0)
    # A float checkpoint loads into a quantized model by quantizing on the fly (weight_scale comes from it).
    third = Block()
    quantize_model(third)
    third.load_state_dict(float_state, strict=False)
    assert torch.equal(third.attn.weight, model.attn.weight)
    torch.testing.assert_close(third.attn(x), model.attn(x), rtol=0, atol=0)


@pytest.mark.parametrize("n,k", [(64, 32), (67, 129), (16, 4)], ids=str)
def test_unpack_inverts_the_cpu_packing(n, k):
    from tiled_diffusion import ops

    w = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    assert torch.equal(ops.unpack_int8_weight_cpu(ops.pack_int8_weight(w), n, k), w)


def test_pack_only_keeps_one_copy_and_behaves_the_same(tmp_path):
    torch.manual_seed(2)
    lin = nn.Linear(129, 67)
    full, compact = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin).pack_only_()
    assert compact.weight is None and compact.packed_weight() is not None
    assert [k for k, _ in compact.state_dict().items()] == [k for k, _ in full.state_dict().items()]
    assert all(torch.equal(compact.state_dict()[k], v) for k, v in full.state_dict().items())
    x = torch.randn(5, 129, dtype=torch.bfloat16)
    assert torch.equal(compact(x), full(x))
    assert torch.equal(compact.dequantized_weight(torch.float32), full.dequantized_weight(torch.float32))
    assert torch.equal(compact.to_linear().weight, full.to_linear().weight)
    # Loading a different checkpoint re-packs: the output follows the new weights.
    other = Int8Linear.from_linear(nn.Linear(129, 67))
    compact.load_state_dict(other.state_dict())
    assert compact.weight is None and torch.equal(compact(x), other(x))
    # .to() keeps working (the plain weight is rebuilt for the move, then dropped again on the CPU).
    compact.to(torch.float32)
    assert compact.weight is None and torch.equal(compact(x), other(x))
    path = str(tmp_path / "c.safetensors")
    save_quantized(compact, path)
    again = Int8Linear.from_linear(lin)
    load_quantized(again, path)
    assert torch.equal(again(x), other(x))
    # Off the CPU (meta stands in for CUDA here) the plain weight is what the kernels read: it comes back and the
    # CPU-packed copy is dropped.
    moved = Int8Linear.from_linear(lin).pack_only_().to("meta")
    assert moved.weight is not None and moved.weight.device.type == "meta" and moved._packed is None
    # w8a16 has no packed layout: pack_only_ is a no-op there.
    assert Int8Linear.from_linear(lin, "w8a16").pack_only_().weight is not None


def test_int8_embedding_lookup_ties_and_restore():
    from tiled_diffusion.model.int8 import Int8Embedding
    from tiled_diffusion.model.int8 import quantize_embeddings
    from tiled_diffusion.model.int8 import restore_embeddings

    torch.manual_seed(3)
    emb = nn.Embedding(301, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        emb.weight[7] *= 40  # one loud row: per-row scales keep the others precise
    model = nn.Module()
    model.shared, model.enc, model.other = emb, nn.Module(), nn.Embedding(5, 3)
    model.enc.embed_tokens = emb  # the same module twice
    model.enc.tied = nn.Embedding(301, 48, _weight=emb.weight)  # another module on the same weight, like T5
    ids = torch.randint(0, 301, (2, 17))
    ids[0, 0] = 7
    ref = emb(ids).float()
    tied = model.enc.tied
    swaps = quantize_embeddings(model)
    assert isinstance(model.shared, Int8Embedding) and isinstance(model.other, Int8Embedding)
    assert model.enc.embed_tokens is model.shared and model.enc.tied is model.shared  # one int8 table
    assert sorted(n for _, _, names in swaps for n in names) == ["enc.embed_tokens", "enc.tied", "other", "shared"]
    out = model.enc.embed_tokens(ids)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # Per-row symmetric int8: error ≤ half a step (max|row|/127/2) plus the bf16 rounding of the output.
    step = emb.weight.float().abs().amax(1)[ids] / 127
    assert ((out.float() - ref).abs() <= step[..., None] / 2 + ref.abs() * 2**-8 + 1e-6).all()
    assert sqnr_db(ref, out.float()) > 35
    restore_embeddings(model, swaps)
    assert model.shared is emb and model.enc.embed_tokens is emb and model.enc.tied is tied
    assert type(model.other) is nn.Embedding


def test_state_dict_is_the_float_layers_and_loads_back(recwarn):
    """Default format: what nn.Linear saves — the kept original exactly, else the dequantized weight (warned)."""
    torch.manual_seed(3)
    lin = nn.Linear(67, 45)
    kept = Int8Linear.from_linear(lin).attach_original(lin)
    sd = kept.state_dict()
    assert list(sd) == ["weight", "bias"] and torch.equal(sd["weight"], lin.weight)
    plain = nn.Linear(67, 45)
    plain.load_state_dict(Int8Linear.from_linear(lin).state_dict())
    assert any("dequantized" in str(w.message) for w in recwarn)
    assert torch.equal(plain.weight, Int8Linear.from_linear(lin).dequantized_weight(torch.float32))
    # and a float state dict quantizes as it loads: the same integers as from_linear
    q = Int8Linear(67, 45)
    q.load_state_dict(lin.state_dict())
    with int8_state_dict():
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), kept.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cast_keeps_scales_fp32(dtype):
    torch.manual_seed(4)
    lin, emb = nn.Linear(67, 45), nn.Embedding(33, 19)
    q, e = Int8Linear.from_linear(lin).attach_original(lin), Int8Embedding.from_embedding(emb).attach_original(emb)
    scale = q.weight_scale.clone()
    q.to(dtype), e.to(dtype)
    assert q.weight_scale.dtype == e.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight_scale, scale)  # not rounded through the half type
    assert q.bias.dtype == dtype and lin.weight.dtype == dtype and emb.weight.dtype == dtype
    x = torch.randn(5, 67).to(dtype)
    assert q(x).dtype == dtype and e(torch.tensor([1, 32])).dtype == dtype
    assert q.state_dict()["weight"].dtype == e.state_dict()["weight"].dtype == dtype


def test_concat_is_the_layers_side_by_side():
    torch.manual_seed(5)
    layers = [Int8Linear.from_linear(nn.Linear(67, n)) for n in (45, 45, 13)]
    fused = Int8Linear.concat(layers)
    x = torch.randn(7, 67)
    assert torch.equal(fused(x), torch.cat([q(x) for q in layers], dim=-1))
