"""accelerate(pipe) / restore(pipe): the table-driven swaps and their exact revert (tiny model, CPU)."""
import pytest
import torch
from diffusers import PixArtSigmaPipeline

from tiled_diffusion import pipeline as P
from tiled_diffusion.pipeline import swaps
from tiled_diffusion.model.attention import CrossTileAttnProcessor
from tiled_diffusion.model.positional import CanvasPatchEmbed, patch_tokens
from tiled_diffusion.tiny import tiny_pipeline

PROMPT = "a small dog in the snow"


def run_plain(pipe, w=256, h=256):
    gen = torch.Generator().manual_seed(3)
    return pipe(PROMPT, width=w, height=h, num_inference_steps=2, guidance_scale=0.0, generator=gen,
                use_resolution_binning=False, output_type="latent", clean_caption=False).images


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("int8", [None, "w8a8"])
def test_restore_returns_original_behaviour(pipe, int8):
    before = run_plain(pipe)
    tr_state, te_state = snapshot(pipe.transformer), snapshot(pipe.text_encoder)
    procs = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    P.accelerate(pipe, int8=int8, text_encoder_int8=int8 is not None)
    P.generate(pipe, PROMPT, width=384, height=256, steps=1, output_type="latent", progress=False, tile=128)
    P.restore(pipe)
    assert same_state(snapshot(pipe.transformer), tr_state)
    assert same_state(snapshot(pipe.text_encoder), te_state)
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == procs
    assert type(pipe.transformer.pos_embed).__name__ == "PatchEmbed"
    assert not pipe.transformer.norm_out._forward_pre_hooks
    assert not hasattr(pipe.transformer, "_tiled_diffusion")
    assert torch.equal(run_plain(pipe), before)


def test_swaps_are_in_place_and_keep_state_dict_keys(pipe):
    keys = set(pipe.transformer.state_dict())
    P.accelerate(pipe, int8=None, text_encoder_int8=False)
    tr = pipe.transformer
    assert set(tr.state_dict()) == keys
    assert isinstance(tr.pos_embed, CanvasPatchEmbed)
    procs = tr.attn_processors
    assert all(isinstance(v, CrossTileAttnProcessor) for k, v in procs.items() if "attn1" in k)
    assert not any(isinstance(v, CrossTileAttnProcessor) for k, v in procs.items() if "attn2" in k)


def test_int8_swap_keeps_state_dict_keys(pipe):
    """The int8 layers save as the float ones (issue 22); their int8 format adds only the scales."""
    from tiled_diffusion.model.int8 import int8_state_dict

    keys = set(pipe.transformer.state_dict())
    P.accelerate(pipe, int8="w8a8", text_encoder_int8=False)
    assert set(pipe.transformer.state_dict()) == keys
    with int8_state_dict():
        new = set(pipe.transformer.state_dict())
    assert keys < new and all(k.endswith("weight_scale") for k in new - keys)


def test_accelerated_pipe_called_directly_is_unchanged(pipe):
    """With no canvas set, the processors are AttnProcessor2_0 and the patch embedding is PatchEmbed."""
    before = run_plain(pipe)
    # a 256² canvas: the default tile (512 px) and a token-centred window of 2x the tiny model's 128-px training
    # size both cover it, so the canvas forward is the plain model's
    P.accelerate(pipe, int8=None, text_encoder_int8=False, window=2.0)
    assert torch.equal(run_plain(pipe), before)


def test_accelerate_twice(pipe):
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=512)
    assert P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=512) is pipe  # same settings: no-op
    with pytest.raises(RuntimeError, match="restore"):
        P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256)
    P.restore(pipe)
    P.restore(pipe)  # not accelerated: no-op
    P.accelerate(pipe, int8=None, text_encoder_int8=False, tile=256)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="mode"):
        P.accelerate(pipe, mode="tiles")
    with pytest.raises(ValueError, match="int8"):
        P.accelerate(pipe, int8="w4a4")
    with pytest.raises(TypeError, match="PixArt"):
        P.accelerate(torch.nn.Linear(2, 2))
    assert not hasattr(pipe.transformer, "_tiled_diffusion")
    with pytest.raises(RuntimeError, match="accelerate"):
        P.generate(pipe, PROMPT, width=256, height=256)


def test_bare_transformer(pipe):
    tr = pipe.transformer
    state = snapshot(tr)
    P.accelerate(tr, int8="w8a8")
    assert isinstance(tr.pos_embed, CanvasPatchEmbed)
    P.restore(tr)
    assert same_state(snapshot(tr), state)
    assert type(tr.pos_embed).__name__ == "PatchEmbed"


def test_sigma_pipeline(pipe):
    sigma = PixArtSigmaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                transformer=pipe.transformer, scheduler=pipe.scheduler)
    sigma.set_progress_bar_config(disable=True)
    P.accelerate(sigma, int8=None, text_encoder_int8=False, tile=128)
    lat = P.generate(sigma, PROMPT, width=256, height=256, steps=1, output_type="latent", progress=False)
    f = sigma.vae_scale_factor
    assert lat.shape == (1, 4, 256 // f, 256 // f) and torch.isfinite(lat).all()
    P.restore(sigma)


def test_failed_accelerate_leaves_pipe_untouched(pipe, monkeypatch):
    def boom(tr, st):
        raise RuntimeError("boom")

    rows = [(n, c, w, boom if n == "token_order_hook" else a, r) for n, c, w, a, r in P.SWAPS]
    monkeypatch.setattr(swaps, "SWAPS", rows)  # the table accelerate reads
    with pytest.raises(RuntimeError, match="boom"):
        P.accelerate(pipe, int8=None, text_encoder_int8=False)
    assert type(pipe.transformer.pos_embed).__name__ == "PatchEmbed"
    assert not any(isinstance(v, CrossTileAttnProcessor) for v in pipe.transformer.attn_processors.values())


def test_least_memory_setting_gives_the_same_image():
    """keep_original_weights=False: T5 table in int8, W8A8 layers pack-only on the CPU; same result as the default
    int8 setting (the embedding rows are the only extra rounding, so compare with the T5 table quantized too)."""
    from tiled_diffusion.model.int8 import Int8Embedding
    from tiled_diffusion.model.int8 import Int8Linear

    kw = dict(width=384, height=256, steps=1, output_type="latent", progress=False, tile=128)
    a, b = tiny_pipeline(), tiny_pipeline()
    P.accelerate(a, int8="w8a8", keep_original_weights=True)
    P.accelerate(b, int8="w8a8", keep_original_weights=False)
    assert isinstance(b.text_encoder.shared, Int8Embedding)
    assert b.text_encoder.encoder.embed_tokens is b.text_encoder.shared
    lins = [m for m in b.transformer.modules() if isinstance(m, Int8Linear)]
    assert lins and all(m.weight is None for m in lins)
    assert torch.equal(P.generate(a, PROMPT, **kw), P.generate(b, PROMPT, **kw))
    P.restore(b)
    assert type(b.text_encoder.shared) is torch.nn.Embedding
    assert not any(isinstance(m, (Int8Linear, Int8Embedding)) for m in b.transformer.modules())


def test_int8_auto_is_the_default_and_follows_resolve_mode(pipe):
    from tiled_diffusion.model.int8 import Int8Linear
    from tiled_diffusion.model.int8 import resolve_mode

    P.accelerate(pipe, text_encoder_int8=False)
    expected = resolve_mode("auto", "cpu")[0]
    assert P.state(pipe).int8 == expected
    assert any(isinstance(m, Int8Linear) for m in pipe.transformer.modules()) == (expected is not None)
    assert P.accelerate(pipe, int8="auto", text_encoder_int8=False) is pipe  # the same resolved settings: no-op
    P.restore(pipe)


@pytest.mark.parametrize("p,c,d", [(2, 4, 96), (4, 4, 24), (2, 3, 17)])
def test_patch_tokens_is_the_conv_and_band_stable(p, c, d):
    """model.positional.patch_tokens: PatchEmbed's conv as one GEMM over flattened patches — the conv's values (fp32:
    the same 4·p² products summed in another order, < 1e-6 relative) in raster token order, and any band of token
    rows embeds bitwise as those rows of the whole input (what a rank's band relies on; the conv's kernel choice
    depends on the input's extent, so its rows need not)."""
    gen = torch.Generator().manual_seed(p * 100 + d)
    conv = torch.nn.Conv2d(c, d, p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(d, generator=gen))
        h, w = 37, 11  # token rows, columns
        x = torch.randn(2, c, h * p, w * p, generator=gen)
        full = patch_tokens(conv, x)
        ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=p)
        ref = ref.flatten(2).transpose(1, 2)
        assert full.shape == (2, h * w, d)
        assert ((full.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
        for a, b in ((0, 5), (13, 37), (20, 29)):
            assert torch.equal(patch_tokens(conv, x[:, :, a * p:b * p]), full[:, a * w:b * w])
        odd = torch.nn.Conv2d(c, d, 3, stride=1, padding=1)  # not a patchify conv: left to torch
        assert torch.equal(patch_tokens(odd, x), odd(x).flatten(2).transpose(1, 2))
