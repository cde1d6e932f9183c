"""VAE decode/encode on a small SD-architecture AutoencoderKL with random weights (scale factor 2, 13 GroupNorms in
the decoder): the banded path equals the plain one up to floating-point order at every band height, with the mid-block
attention global; one tile is plain, bitwise; the memory rule picks plain / banded / overlap; the approximate
overlap-tiled decode (`tiled_decode`) gets better with more overlap and with enough statistics passes."""
import logging

import pytest
import torch

from tiled_diffusion.vae import banded as V
from tiled_diffusion.vae.banded import banded_decode
from tiled_diffusion.vae.banded import banded_encode_moments
from tiled_diffusion.vae.banded import decode
from tiled_diffusion.vae.banded import encode
from tiled_diffusion.vae.banded import tiled_decode
from tiled_diffusion.vae.banded import vae_scale_factor
from tests.helpers import small_vae as _vae, structured_latents as _latents


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny decoders run hundreds of small convolutions; on a shared 2-core machine the second thread's
    barrier waits cost more than it computes (measured 0.42 s vs 2.3 s for one plain decode under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(B=2, H=42, W=54):
    torch.manual_seed(2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    return (0.3 * torch.randn(B, 3, H, W) + torch.stack([xx, yy, xx * yy])[None]).clamp(-1, 1)


def _rms(a, b):
    """Relative RMS error of a against the reference b, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


# --- exact banded path vs plain (fp32: every difference is floating-point order, ~1e-6)

@pytest.mark.parametrize("tile", [2, 5, 8, 20], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("attention", [False, True], ids=["conv+gn", "global_attn"])
def test_banded_decode_matches_plain(tile, attention):
    vae, z = _vae(attention), _latents(h=21, w=27)
    with torch.no_grad():
        full = vae.decode(z).sample
        out = banded_decode(vae, z, tile=tile)
    assert out.shape == full.shape == (2, 3, 42, 54) and out.dtype == full.dtype
    assert _rms(out, full) <= 1e-5, _rms(out, full)


def test_banded_decode_far_more_exact_than_overlap_tiles():
    """The same canvas with 64-latent-class tiles scaled down (tile 24, overlap 8, 3x3 tiles): today's default of the
    approximate path (per-tile GroupNorm), against banded bands of the same height."""
    vae, z = _vae(attention=False), _latents(B=1)
    with torch.no_grad():
        full = vae.decode(z).sample
        banded = _rms(banded_decode(vae, z, tile=24), full)
        per_tile = _rms(tiled_decode(vae, z, tile=24, overlap=8), full)
    print(f"relative RMS vs plain: banded {banded:.2e}, overlap per-tile GN {per_tile:.3f}")
    assert banded <= 1e-5 and per_tile > 1e4 * banded


@pytest.mark.parametrize("tile", [3, 8], ids=lambda t: f"tile{t}")
def test_banded_encode_matches_plain(tile):
    vae, x = _vae(attention=True), _images()
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
        m = banded_encode_moments(vae, x, tile=tile)
    assert m.shape == (2, 8, 21, 27)
    assert _rms(m[:, :4], ref.mean) <= 1e-5 and _rms(m[:, 4:], ref.logvar) <= 1e-5


def test_encode_sample_uses_the_generator_like_diffusers():
    vae, x = _vae(attention=True), _images()
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        out = encode(vae, x, tile=4, generator=torch.Generator().manual_seed(5), progress=False)
        mean = encode(vae, x, tile=4, sample=False, progress=False)
    assert _rms(out, ref) <= 1e-5 and _rms(mean, vae.encode(x).latent_dist.mean) <= 1e-5


def test_bf16_banded_error_within_plain_bf16_error():
    """bf16 vs an fp32 reference: the banded decode's error is within 2x the plain bf16 decode's own (+ eps)."""
    ref_vae, z = _vae(attention=True), _latents(h=21, w=27)
    vae = _vae(attention=True, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = ref_vae.decode(z).sample
        plain = _rms(vae.decode(z.bfloat16()).sample, ref)
        banded = _rms(banded_decode(vae, z.bfloat16(), tile=5), ref)
    assert banded <= 2 * plain + 1e-3, (banded, plain)


# --- one tile is the plain decode, bitwise; the memory rule

def _cl(x):
    return x.contiguous(memory_format=torch.channels_last)


def test_one_tile_decode_is_plain_bitwise():
    """The plain path runs diffusers' decode in channels-last (the fast layout on the CPU, for the banded path too)."""
    vae, z = _vae(attention=True), _latents(h=21, w=27)
    with torch.no_grad():
        full = vae.decode(_cl(z)).sample
        assert torch.equal(decode(vae, z, tile=21, progress=False), full)
        assert torch.equal(decode(vae, z, max_memory_gb=64, progress=False), full)
    assert vae_scale_factor(vae) == 2


def test_one_tile_encode_is_plain_bitwise():
    vae, x = _vae(attention=True), _images()
    with torch.no_grad():
        ref = vae.encode(_cl(x)).latent_dist.mean
        assert torch.equal(encode(vae, x, tile=21, sample=False, progress=False), ref)


def test_memory_rule_picks_banded_when_plain_does_not_fit():
    vae = _vae(attention=True)
    z = torch.empty(2, 4, 84, 108, device="meta")  # the rule only reads the shape
    plain = V.estimate_decode_bytes(vae, 168, 216, torch.float32, batch=2)
    store, band = V.estimate_banded_bytes(vae, 168, 216, torch.float32, tile=2, batch=2)
    assert store + band < plain
    assert V.estimate_decode_bytes(vae, 336, 432, torch.float32, batch=2) > 3 * plain  # grows with the canvas
    budget_gb = (store + band) / 2**30 * 1.01
    plan = V.plan_method(vae, z, encode=False, max_memory_gb=budget_gb, tile=None)
    assert plan["method"] == "banded" and 2 <= plan["tile"] < 84
    s, b = V.estimate_banded_bytes(vae, 168, 216, torch.float32, tile=plan["tile"], batch=2)
    assert s + b <= budget_gb * 2**30  # the tallest band that fits, fits
    assert V.plan_method(vae, z, encode=False, max_memory_gb=plain / 2**30, tile=None)["method"] == "plain"


def test_estimates_from_config_equal_module():
    vae = _vae(attention=True)
    assert V.estimate_decode_bytes(vae.config, 168, 216, torch.float32) == V.estimate_decode_bytes(vae, 168, 216)
    assert V.estimate_vae_bytes(vae.config, 168, 216, torch.float32) == V.estimate_vae_bytes(vae, 168, 216) <= \
        V.estimate_decode_bytes(vae, 168, 216)


def test_memory_rule_decodes_exactly_under_a_small_budget():
    vae, z = _vae(attention=True), _latents(h=21, w=27)
    store, band = V.estimate_banded_bytes(vae, 42, 54, torch.float32, tile=3, batch=2)
    with torch.no_grad():
        out = decode(vae, z, max_memory_gb=(store + band) / 2**30, progress=False)
        assert _rms(out, vae.decode(z).sample) <= 1e-5


def test_memory_rule_falls_back_to_overlap_tiles(caplog):
    vae, z = _vae(attention=False), _latents(h=21, w=27)
    with caplog.at_level(logging.WARNING, logger="tiled_diffusion"), torch.no_grad():
        out = decode(vae, z, max_memory_gb=1e-9, progress=False)
    assert out.shape == (2, 3, 42, 54) and "approximate" in caplog.text


def test_progress_and_modules_untouched():
    vae, z = _vae(attention=True), _latents(h=12, w=10)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        banded_decode(vae, z, tile=3, progress=True)
    after = vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input():
    vae = _vae(attention=False)
    with pytest.raises(ValueError, match="latents must be"):
        decode(vae, torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="images must be"):
        encode(vae, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="tile must be"):
        decode(vae, torch.randn(1, 4, 8, 8), tile=0)
    with pytest.raises(ValueError, match="tile_batch"):
        tiled_decode(vae, torch.randn(1, 4, 8, 8), tile_batch=0)


@pytest.mark.cuda
def test_banded_decode_cuda_with_cpu_store():
    vae, z = _vae(attention=True).cuda(), _latents(h=21, w=27).cuda()
    with torch.no_grad():
        full = vae.decode(z).sample
        out = banded_decode(vae, z, tile=4, store=torch.device("cpu"))
    assert out.device.type == "cuda" and _rms(out, full) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_var_mean_moments_match_fp64(dtype):
    """The moments path of every non-CPU device (CUDA), run here on a channels-last band slice of odd size against
    fp64: fp32 Welford over <= 4·7·19 values per group is exact to ~1e-6 relative (the input is taken as rounded)."""
    torch.manual_seed(3)
    canvas = _cl((3 + 2 * torch.randn(2, 24, 31, 19)).to(dtype))
    band = canvas[:, :, 5:12]  # not contiguous in any format: a band of a channels-last canvas
    mean, m2 = V.var_mean_moments(band, 6)
    x = band.double().reshape(2, 6, -1)
    ref_mean = x.mean(-1)
    ref_m2 = (x - ref_mean[..., None]).square().sum(-1)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (2, 6)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, ref_m2, rtol=1e-5, atol=0)
    cpu_mean, cpu_m2, n = V.band_moments(band, 6)  # the CPU's group-norm path agrees
    assert n == 4 * 7 * 19
    torch.testing.assert_close(cpu_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu_m2, m2, rtol=1e-5, atol=0)


def test_cuda_free_bytes_count_the_caching_allocators_unused_blocks(monkeypatch):
    """Issue 21 risk: after a denoise loop torch's caching allocator holds reserved-but-unused blocks that the
    driver reports as used; the memory rule must count them as free (this process reuses them)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 20 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 << 30)
    assert V._free_bytes(torch.device("cuda", 0)) == (3 + 14) << 30

@pytest.mark.cuda
@pytest.mark.parametrize("store", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("what", ["decode", "encode"])
def test_banded_half_precision_cuda(what, dtype, store):
    """Issue 21 defect 1 (CUDA only: the CPU's group norm accepts channels-last mixed dtypes): banded decode and
    encode in bf16/fp16 on CUDA, store on the GPU or the CPU, within 2x the plain half-precision error vs fp32."""
    ref_vae = _vae(attention=True).cuda()
    vae = _vae(attention=True, dtype=dtype).cuda()
    with torch.no_grad():
        if what == "decode":
            z = _latents(h=21, w=27).cuda()
            ref = ref_vae.decode(z).sample
            plain = _rms(vae.decode(z.to(dtype)).sample, ref)
            out = banded_decode(vae, z.to(dtype), tile=5, store=torch.device(store))
        else:
            x = _images().cuda()
            ref = ref_vae.encode(x).latent_dist.mean
            plain = _rms(vae.encode(x.to(dtype)).latent_dist.mean, ref)
            out = banded_encode_moments(vae, x.to(dtype), tile=5, store=torch.device(store))[:, :4]
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert _rms(out, ref) <= 2 * plain + 1e-3, (_rms(out, ref), plain)


# --- the approximate overlap-tiled decode: errors that must shrink do

def test_overlap_one_tile_equals_decode():
    vae, z = _vae(attention=True), _latents(h=21, w=27)
    with torch.no_grad():
        full = vae.decode(z).sample
        out = tiled_decode(vae, z, tile=64, overlap=16)
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)


def test_overlap_error_shrinks_with_overlap():
    """Measured (no mid-block attention, 32x40 latent): per-tile GN 0.69 (tile 16, overlap 4) -> 0.56 (tile 20,
    overlap 12)."""
    vae, z = _vae(attention=False), _latents(B=1, h=32, w=40)
    with torch.no_grad():
        full = vae.decode(z).sample
        err = {ov: _rms(tiled_decode(vae, z, tile={4: 16, 12: 20}[ov], overlap=ov, tile_batch=16), full)
               for ov in (4, 12)}
    assert err[12] < 0.9 * err[4], err


def test_overlap_tile_batch_does_not_change_result():
    vae, z = _vae(attention=True), _latents(h=20, w=28)
    with torch.no_grad():
        a = tiled_decode(vae, z, tile=12, overlap=4, tile_batch=1)
        b = tiled_decode(vae, z, tile=12, overlap=4, tile_batch=5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
