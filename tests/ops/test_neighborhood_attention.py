"""neighborhood_attention: the reference vs a brute-force per-query mask (fp64), the CPU path vs the reference, and
the special cases — stride = tile with window (2r+1)·tile, clip, is today's `window_attention`; a window covering
the canvas is global attention.

Tolerances as tests/ops/test_window_attention.py: `err(ours) <= 2 * err(naive attention in the same dtype) + eps`
against fp64; lse is fp32 state, fixed absolute tolerance.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tiled_diffusion import ops
from tiled_diffusion import reference
from tiled_diffusion.core.tiling import TileGrid

LSE_ATOL = 2e-3


def brute_keys(n, w, s, clip, o=0):
    """Per query index, the list of key indices along one axis, from NATTEN's definition in plain Python."""
    keys = []
    for i in range(n):
        g0 = o
        while g0 + s <= i:  # the first token of the query's group (groups start at o)
            g0 += s
        c = g0 + s // 2  # the query's group centre (the query itself at stride 1)
        lo = c - w // 2  # w // 2 keys before the centre, (w - 1) // 2 after
        if clip:
            keys.append([j for j in range(lo, lo + w) if 0 <= j < n])
        elif w >= n:
            keys.append(list(range(n)))
        else:
            lo = min(max(lo, 0), n - w)  # shift inward: always w keys
            keys.append(list(range(lo, lo + w)))
    return keys


def brute_mask(Ht, Wt, window, stride, clip, offset=(0, 0)):
    ky = brute_keys(Ht, window[0], stride[0], clip, offset[0])
    kx = brute_keys(Wt, window[1], stride[1], clip, offset[1])
    m = torch.zeros(Ht, Wt, Ht, Wt, dtype=torch.bool)
    for y in range(Ht):
        for x in range(Wt):
            for yy in ky[y]:
                m[y, x, yy, kx[x]] = True
    return m.reshape(Ht * Wt, Ht * Wt)



def _check_against_reference(out, lse, q, k, v, window, stride, clip, offset):
    """out/lse against the fp64 reference: no NaN, out within 2x the same-dtype masked-SDPA baseline's error (+ eps
    by dtype), lse within LSE_ATOL."""
    Ht, Wt = q.shape[2], q.shape[3]
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, stride, clip,
                                                        offset)
    assert not out.isnan().any() and not lse.isnan().any()
    allowed = brute_mask(Ht, Wt, window, stride, clip, offset)
    base = (masked_attention(q, k, v, allowed)[0].double() - ref_out).abs().max().item()
    err = (out.double() - ref_out).abs().max().item()
    eps = 1e-5 if q.dtype == torch.float32 else 1e-3
    assert err <= 2 * base + eps, f"err {err:.3g} vs same-dtype baseline {base:.3g}"
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)

def masked_attention(q, k, v, allowed, scale=None):
    """Plain masked attention on [B, H, Ht, Wt, D] in q's dtype (fp64 in: the oracle; else the error baseline)."""
    B, H, Ht, Wt, D = q.shape
    qf, kf, vf = (t.reshape(B, H, Ht * Wt, D) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * (1 / math.sqrt(D) if scale is None else scale)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).reshape(q.shape), torch.logsumexp(s.double(), dim=-1).reshape(B, H, Ht, Wt)


def inputs(B, H, Ht, Wt, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, Ht, Wt, D, generator=g).to(dtype) for _ in range(3))


# (Ht, Wt, window, stride, clip): canvases not multiples of the window or stride, even and odd windows
REF_CASES = [
    (7, 9, (3, 5), (1, 1), False),
    (7, 9, (4, 2), (1, 1), False),
    (10, 7, (6, 4), (3, 2), False),
    (10, 7, (6, 4), (3, 2), True),
    (5, 6, (9, 11), (1, 1), False),  # window > canvas: global
    (9, 8, (9, 6), (3, 2), True),  # tile-blocked: stride 3x2 tiles, radius 1
    (7, 5, (2, 2), (2, 2), True),  # radius 0 (independent tiles), partial last tiles
    (10, 9, (9, 6), (3, 2), True, (-1, -1)),  # tile-blocked, grid shifted (partial first and last tiles)
    (10, 9, (5, 4), (3, 2), False, (-2, -1)),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[str(c) for c in REF_CASES])
def test_reference_vs_brute_force(case):
    Ht, Wt, window, stride, clip = case[:5]
    offset = case[5] if len(case) > 5 else (0, 0)
    q, k, v = inputs(2, 2, Ht, Wt, 8, torch.float64)
    allowed = brute_mask(Ht, Wt, window, stride, clip, offset)
    want_out, want_lse = masked_attention(q, k, v, allowed)
    out, lse = reference.neighborhood_attention(q, k, v, window, stride, clip, offset)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=0)


CPU_CASES = [  # (B, H, Ht, Wt, D, window, stride, clip, dtype[, offset])
    (2, 3, 13, 11, 72, (5, 7), (1, 1), False, torch.float32),
    (2, 3, 13, 11, 72, (5, 7), (1, 1), False, torch.bfloat16),
    (1, 2, 19, 17, 16, (6, 4), (1, 1), False, torch.float32),  # even windows
    (2, 2, 19, 17, 16, (9, 7), (3, 2), False, torch.bfloat16),  # GNA stride, partial last groups
    (1, 2, 21, 18, 16, (12, 12), (4, 4), False, torch.float32),
    (2, 2, 12, 15, 16, (12, 15), (4, 5), True, torch.float32),  # tile-blocked r1 (clip)
    (1, 2, 14, 10, 16, (4, 4), (4, 4), True, torch.bfloat16),  # radius 0, partial last tiles
    (2, 2, 9, 7, 16, (30, 30), (1, 1), False, torch.float32),  # window > canvas: global
    (1, 1, 23, 9, 8, (3, 3), (1, 1), True, torch.float32),  # clip at stride 1
    (2, 2, 13, 17, 16, (9, 12), (3, 4), True, torch.float32, (-1, -2)),  # blocked r1, half-tile shift, no wrap
    (1, 2, 13, 17, 16, (6, 4), (3, 4), False, torch.bfloat16, (-2, -3)),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=[f"{c[2]}x{c[3]}-w{c[5]}-s{c[6]}-{'clip' if c[7] else 'in'}-"
                                                 f"{str(c[8])[6:]}{'-o' + str(c[9]) if len(c) > 9 else ''}"
                                                 for c in CPU_CASES])
def test_cpu_vs_reference(case):
    B, H, Ht, Wt, D, window, stride, clip, dtype = case[:9]
    offset = case[9] if len(case) > 9 else (0, 0)
    q, k, v = inputs(B, H, Ht, Wt, D, dtype, seed=Ht * Wt)
    out, lse = ops.neighborhood_attention(q, k, v, window, stride, clip, offset)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous()
    _check_against_reference(out, lse, q, k, v, window, stride, clip, offset)


@pytest.mark.parametrize("block", [1, 3, 16])
def test_cpu_block_size_does_not_change_the_result(block):
    from tiled_diffusion.backends.cpu.neighborhood_attention import neighborhood_attention_cpu

    q, k, v = inputs(1, 2, 11, 13, 16, torch.float32, seed=3)
    ref_out, _ = reference.neighborhood_attention(q, k, v, (5, 6), (1, 1), False)
    out, _ = neighborhood_attention_cpu(q, k, v, (5, 6), (1, 1), False, block=block)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)


def test_strided_inputs():
    """The processor passes [B, Ht, Wt, H, D] views permuted to [B, H, Ht, Wt, D]."""
    q, k, v = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
               for t in inputs(2, 3, 9, 10, 16, torch.float32, seed=5))
    assert not q.is_contiguous()
    out, lse = ops.neighborhood_attention(q, k, v, (5, 5))
    ref_out, ref_lse = reference.neighborhood_attention(q, k, v, (5, 5))
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tile_blocked_special_case_is_window_attention(radius, dtype):
    """stride = tile, window = (2r+1)·tile, clip: today's window_attention over the tile-major tokens, equal on
    the same tokens (compared after the grid's permutation)."""
    B, H, D = 2, 2, 16
    grid = TileGrid.for_tokens(2 * 15, 2 * 12, (2 * 3, 2 * 4), batch=B)  # 15x12 tokens, 3x4-token tiles
    th, tw = grid.tile_tokens_h, grid.tile_tokens_w
    q, k, v = inputs(B, H, grid.tokens_h, grid.tokens_w, D, dtype, seed=radius)
    window = ((2 * radius + 1) * th, (2 * radius + 1) * tw)
    out, _ = ops.neighborhood_attention(q, k, v, window, (th, tw), True)
    # [B, H, Ht, Wt, D] -> tile-major [B·T, H, L, D]
    tm = lambda t: grid.to_tile_major(t.permute(0, 2, 3, 1, 4).reshape(B, -1, H, D)).transpose(1, 2)  # noqa: E731
    nb = grid.neighbours(radius)
    old, _ = ops.window_attention(tm(q), tm(k), tm(v), nb)
    old_ref, _ = reference.window_attention(tm(q.double()), tm(k.double()), tm(v.double()), nb)
    new_ref, _ = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, (th, tw), True)
    torch.testing.assert_close(tm(new_ref), old_ref, atol=1e-12, rtol=0)  # the same math
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tm(out).float(), old.float(), atol=tol, rtol=0)


def test_window_covering_canvas_is_global_attention():
    q, k, v = inputs(2, 3, 9, 11, 16, torch.float32, seed=7)
    out, _ = ops.neighborhood_attention(q, k, v, (9, 11))
    flat = lambda t: t.reshape(2, 3, 99, 16)  # noqa: E731
    want = F.scaled_dot_product_attention(flat(q), flat(k), flat(v)).reshape(q.shape)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=0)


def test_empty_windows_with_clip():
    """clip with a stride group whose centre lies past the canvas: those queries have no key."""
    q, k, v = inputs(1, 1, 5, 4, 8, torch.float32, seed=9)
    out, lse = ops.neighborhood_attention(q, k, v, (2, 4), (2, 4), True)  # ok: every group has keys
    ref_out, ref_lse = reference.neighborhood_attention(q, k, v, (2, 4), (2, 4), True)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)
    out, lse = ops.neighborhood_attention(q, k, v, (1, 1), (1, 1), True)  # window 1: itself
    torch.testing.assert_close(out, v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_opcheck(strided):
    q, k, v = inputs(2, 2, 7, 6, 8, torch.float32, seed=11)
    if strided:
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    torch.library.opcheck(torch.ops.tiled_diffusion.neighborhood_attention.default, (q, k, v, [3, 4], [1, 2], False, [0, -1]))


def test_opcheck_band():
    """The band form (q rows [4, 11), k/v the rows its windows need) through the op's schema and fake."""
    q, k, v = inputs(1, 2, 15, 6, 8, torch.float32, seed=12)
    torch.library.opcheck(torch.ops.tiled_diffusion.neighborhood_attention.default,
                          (q[:, :, 4:11].contiguous(), k[:, :, 2:13].contiguous(), v[:, :, 2:13].contiguous(), [5, 3],
                           [1, 1], False, [0, 0], None, [15, 4, 2]))


@pytest.mark.parametrize("kw,match", [
    (dict(window=(3, 3), stride=(4, 1)), "stride <= window"),
    (dict(window=(0, 3)), "stride <= window"),
    (dict(window=(3,)), "pairs"),
    (dict(window=(3, 3), scale=-1.0), "scale"),
    (dict(window=(3, 3), stride=(2, 2), offset=(-2, 0)), "offset"),
])
def test_bad_inputs(kw, match):
    q, k, v = inputs(1, 1, 5, 5, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.neighborhood_attention(q, k, v, **kw)


def test_bad_layout():
    q = torch.randn(1, 5, 5, 8)
    with pytest.raises(ValueError, match="5-D"):
        ops.neighborhood_attention(q, q, q, (3, 3))


# ------------------------------------------------------------------ the canvas forward: no seams by construction


def _canvas_forward(tr, lat):
    """The accelerated tiny transformer's canvas output [B, C_out, h, w], fp32, positions left out (see below)."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(lat.shape[0], 7, tr.config.caption_channels, generator=g)
    return tr(lat, encoder_hidden_states=emb, encoder_attention_mask=torch.ones(lat.shape[0], 7),
              timestep=torch.tensor([400.0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)[0]


def _position_free(tr):
    """Replace the patch embedding's output by its token-wise part (projection, no absolute positions): the
    positional embedding is the one input that is not translation-invariant by definition, so leaving it out
    isolates what the windows do (with positions, what a token sees still never depends on a tile grid)."""
    pe = tr.pos_embed

    def hook(module, args, output):
        x = module.proj(args[0]).flatten(2).transpose(1, 2)
        return module.norm(x) if getattr(module, "layer_norm", False) else x

    return pe.register_forward_hook(hook)


@pytest.mark.parametrize("window,stride,d,equivariant", [
    (0.625, 0.0, 3, True),  # stride 1: any shift
    (0.75, 0.25, 4, True),  # GNA stride 2 tokens: shifts by whole groups
    (None, None, 3, False),  # tile-blocked windows: the tile grid does not move with the content -> seams
], ids=["stride1", "gna-stride2", "blocked"])
def test_translation_equivariance(window, stride, d, equivariant):
    """Shift the latents by d tokens (two interior crops of one larger canvas): with token-centred windows the
    interior output shifts with them; tile-blocked windows do not (the window edges stay on the tile grid)."""
    from tiled_diffusion import pipeline as P
    from tiled_diffusion.tiny import tiny_transformer

    torch.manual_seed(0)
    tr = tiny_transformer(num_layers=2).eval()  # training field 8 tokens
    kw = dict(window=window) if window is None else dict(window=window, stride=stride)
    P.accelerate(tr, mode="cross_tile", tile=64, radius=1, int8=None, **kw)
    handle = _position_free(tr)
    try:
        patch = tr.config.patch_size
        n = 30  # tokens per side of each crop
        big = torch.randn(1, 4, (n + d) * patch, (n + d) * patch, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a = _canvas_forward(tr, big[:, :, d * patch:, d * patch:])  # crop starting at token d
            b = _canvas_forward(tr, big[:, :, :n * patch, :n * patch])  # crop starting at token 0
    finally:
        handle.remove()
        P.restore(tr)
    # Interior: tokens whose receptive field (window half-width per layer, 2 layers) stays off both crops' borders
    m = 2 * 4 * patch + d * patch
    ia = a[:, :, m - d * patch:-m, m - d * patch:-m]  # token t of a is token t + d of b
    ib = b[:, :, m:n * patch - m + d * patch, m:n * patch - m + d * patch]
    assert ia.shape == ib.shape and ia.numel() > 0
    err = ((ia - ib).abs().max() / ib.abs().max()).item()
    if equivariant:
        assert err < 1e-5, f"interior output did not shift with the input: rel err {err:.3g}"
    else:
        assert err > 1e-3, f"tile-blocked windows unexpectedly equivariant: rel err {err:.3g}"


# ------------------------------------------------------------------ the Triton kernel (interpreter on CPU here)

TRITON_CASES = [  # (B, H, Ht, Wt, D, window, stride, clip, offset, dtype): odd canvases, not multiples of the tiles
    (2, 2, 11, 9, 24, (5, 4), (1, 1), False, (0, 0), torch.float32),
    (1, 2, 10, 13, 72, (6, 7), (1, 1), False, (0, 0), torch.bfloat16),
    (2, 1, 13, 11, 16, (9, 6), (3, 2), True, (0, 0), torch.float32),  # tile-blocked r1
    (1, 2, 13, 11, 16, (9, 6), (3, 2), True, (-1, -1), torch.float32),  # shifted blocks, no wrap
    (2, 1, 9, 10, 16, (6, 6), (2, 3), False, (0, -2), torch.bfloat16),  # GNA
    (1, 1, 7, 6, 16, (20, 20), (1, 1), False, (0, 0), torch.float32),  # window > canvas: global
    (1, 1, 9, 7, 16, (2, 3), (2, 3), True, (0, 0), torch.float32),  # radius 0
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"{c[2]}x{c[3]}-D{c[4]}-w{c[5]}-s{c[6]}-"
                                                    f"{'clip' if c[7] else 'in'}-o{c[8]}-{str(c[9])[6:]}"
                                                    for c in TRITON_CASES])
def test_triton_vs_reference(case):
    from tiled_diffusion.backends.triton.neighborhood_attention import neighborhood_attention_triton

    B, H, Ht, Wt, D, window, stride, clip, offset, dtype = case
    q, k, v = inputs(B, H, Ht, Wt, D, dtype, seed=Ht + Wt)
    out = torch.full_like(q, math.nan)  # poison: every element must be written
    lse = torch.full((B, H, Ht, Wt), math.nan, dtype=torch.float32)
    out, lse = neighborhood_attention_triton(q, k, v, window, stride, clip, offset, out=out, lse=lse)
    _check_against_reference(out, lse, q, k, v, window, stride, clip, offset)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_vs_reference(dtype):
    """The op on CUDA (the Triton kernel) at PixArt's head dim on an odd canvas, default geometry."""
    q, k, v = (t.cuda() for t in inputs(2, 4, 37, 29, 72, dtype, seed=13))
    out, lse = ops.neighborhood_attention(q, k, v, (16, 16))
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), (16, 16))
    allowed = brute_mask(37, 29, (16, 16), (1, 1), False).cuda()
    base = (masked_attention(q, k, v, allowed)[0].double() - ref_out).abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= 2 * base + 1e-3
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)


# ------------------------------------------------------------------ bands: one rank's rows and its K/V halo

BAND_CASES = [  # (Ht, Wt, window, stride, clip, offset, q rows [a, b)): windows shifted at the border, GNA, clip
    (23, 9, (7, 5), (1, 1), False, (0, 0), (0, 16)),  # the top band: its window reaches below it
    (23, 9, (7, 5), (1, 1), False, (0, 0), (16, 23)),  # the bottom band: windows shifted inward
    (40, 7, (9, 4), (1, 1), False, (0, 0), (16, 32)),  # a middle band, aligned to the CPU path's 16-row blocks
    (40, 7, (8, 4), (1, 1), False, (0, 0), (11, 29)),  # not aligned: other blocks, same values
    (30, 8, (9, 6), (3, 2), True, (-1, 0), (8, 20)),  # shifted tile-blocked windows (clip, offset)
    (30, 8, (6, 6), (2, 2), False, (0, 0), (16, 30)),  # GNA
]


def _band(case, seed=0):
    Ht, Wt, window, stride, clip, offset, (a, b) = case
    q, k, v = inputs(2, 2, Ht, Wt, 16, torch.float32, seed=seed + Ht + a)
    lo, hi = reference.neighborhood_bounds(Ht, window[0], stride[0], clip, offset[0])
    ka, kb = int(lo[a:b].min()), int(hi[a:b].max())
    return q, k, v, (a, b, ka, kb)


@pytest.mark.parametrize("case", BAND_CASES, ids=[f"{c[0]}x{c[1]}-w{c[2]}-s{c[3]}-rows{c[6]}" for c in BAND_CASES])
def test_band_equals_whole_canvas_rows(case):
    """The op on a band (q rows [a, b), k/v rows [ka, kb) = exactly what its windows need) equals those rows of the
    whole canvas's result: the reference in fp64 to rounding, the CPU path bitwise where the band starts on its
    16-row block grid (what the multi-process halo relies on), to fp32 rounding otherwise."""
    Ht, Wt, window, stride, clip, offset, _ = case
    q, k, v, (a, b, ka, kb) = _band(case)
    band = (Ht, a, ka)
    whole = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, stride, clip, offset)
    part = reference.neighborhood_attention(q[:, :, a:b].double(), k[:, :, ka:kb].double(), v[:, :, ka:kb].double(),
                                            window, stride, clip, offset, band=band)
    torch.testing.assert_close(part[0], whole[0][:, :, a:b], atol=1e-12, rtol=0)
    torch.testing.assert_close(part[1], whole[1][:, :, a:b], atol=1e-6, rtol=0)
    full_out, full_lse = ops.neighborhood_attention(q, k, v, window, stride, clip, offset)
    out, lse = ops.neighborhood_attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], window, stride, clip, offset,
                                          band=band)
    if (a - offset[0]) % 16 == 0 or a == 0:
        assert torch.equal(out, full_out[:, :, a:b]) and torch.equal(lse, full_lse[:, :, a:b])
    else:
        torch.testing.assert_close(out, full_out[:, :, a:b], atol=2e-6, rtol=0)
        torch.testing.assert_close(lse, full_lse[:, :, a:b], atol=2e-6, rtol=0)


@pytest.mark.parametrize("case", BAND_CASES[:3] + BAND_CASES[4:5],
                         ids=[f"rows{c[6]}-s{c[3]}" for c in BAND_CASES[:3] + BAND_CASES[4:5]])
def test_band_triton_vs_reference(case):
    """The Triton kernel on a band (interpreter here), poisoned outputs, against the fp64 reference's rows."""
    from tiled_diffusion.backends.triton.neighborhood_attention import neighborhood_attention_triton

    Ht, Wt, window, stride, clip, offset, _ = case
    q, k, v, (a, b, ka, kb) = _band(case, seed=3)
    qb, kb_, vb = q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb]
    out = torch.full_like(qb, math.nan)
    lse = torch.full(qb.shape[:4], math.nan, dtype=torch.float32)
    out, lse = neighborhood_attention_triton(qb, kb_, vb, window, stride, clip, offset, band=(Ht, a, ka), out=out,
                                             lse=lse)
    ref_out, ref_lse = reference.neighborhood_attention(q.double(), k.double(), v.double(), window, stride, clip,
                                                        offset)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref_out[:, :, a:b], atol=1e-5, rtol=0)  # fp32 (ieee dots)
    torch.testing.assert_close(lse, ref_lse[:, :, a:b], atol=LSE_ATOL, rtol=0)


@pytest.mark.parametrize("band,kr,match", [
    ((20, 4, 0), (0, 12), "need the canvas rows"),  # the windows of rows 4-11 reach row 12+ : k too short
    ((10, 4, 0), (0, 20), "lie in the"),  # q rows past the canvas
    ((20, 4), (0, 12), "canvas_h, q_top, k_top"),
])
def test_band_bad_inputs(band, kr, match):
    q, k, v = inputs(1, 1, 20, 6, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.neighborhood_attention(q[:, :, 4:12], k[:, :, kr[0]:kr[1]], v[:, :, kr[0]:kr[1]], (9, 3), band=band)


@pytest.mark.cuda
def test_cuda_band_equals_whole_canvas_rows():
    """The Triton kernel on a band starting on its 8-row query-block grid walks the whole canvas's blocks and key
    tiles for those rows: bitwise the whole canvas's result (what the multi-process halo relies on over NCCL)."""
    q, k, v = (t.cuda() for t in inputs(2, 4, 64, 37, 72, torch.bfloat16, seed=21))
    whole_out, whole_lse = ops.neighborhood_attention(q, k, v, (16, 16))
    a, b = 16, 48
    lo, hi = reference.neighborhood_bounds(64, 16)
    ka, kb = int(lo[a:b].min()), int(hi[a:b].max())
    out, lse = ops.neighborhood_attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], (16, 16), band=(64, a, ka))
    assert torch.equal(out, whole_out[:, :, a:b]) and torch.equal(lse, whole_lse[:, :, a:b])
