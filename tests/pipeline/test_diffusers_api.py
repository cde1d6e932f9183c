"""diffusers' own API on accelerated pipelines (issue 22): the calls diffusers' PixArt pipeline tests make —
save_pretrained / from_pretrained, `.to(dtype)`, `fuse_qkv_projections`, processor swaps, a second pipeline on
the same components — on the tiny model, CPU, fp32, with the int8 layers in (the defaults' hard cases).

Tolerances: paths that run the same float ops are compared bitwise; a fused QKV GEMM sums in another order than
three GEMMs (fp32, ~1e-7 relative per product, amplified by the 2-step sampler: < 1e-4).
"""
import json
import os
import warnings

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import safe_open

from tiled_diffusion import pipeline as P
from tiled_diffusion.model.attention import CrossTileAttnProcessor
from tiled_diffusion.model.int8 import Int8Embedding
from tiled_diffusion.model.int8 import Int8Linear
from tiled_diffusion.tiny import save_pretrained_offline
from tiled_diffusion.tiny import tiny_pipeline
from tests.helpers import rel_err

PROMPT = "a red house by the lake"
W, H = 384, 256  # latent 48x32: 128-px cross_tile tiles -> a 3x2 grid


@pytest.fixture()
def pipe():
    p = tiny_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def call(pipe, w=W, h=H, steps=2, output_type="latent", **kw):
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=0.0, generator=gen,
                output_type=output_type, clean_caption=False, use_resolution_binning=False, **kw).images


def saved_tensors(folder, component):
    out = {}
    for name in os.listdir(os.path.join(folder, component)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, component, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def reload(folder):
    p = PixArtAlphaPipeline.from_pretrained(str(folder))
    p.set_progress_bar_config(disable=True)
    return p


# ------------------------------------------------------------------------------------------- save / load


def test_save_pretrained_after_accelerate_reloads_as_the_original_model(pipe, tmp_path):
    """Kept originals (the default): plain diffusers reloads the exact float model (every saved tensor bitwise the
    original) -> the same image. The image is compared to fp32 rounding, not bitwise: the reloaded weights sit in
    other (safetensors-aligned) buffers and a BLAS may block its sums by alignment (MKL's conditional
    reproducibility: bitwise here on an AMX Xeon, not on the CI's Zen 4), ~1e-7 relative per sum, < 1e-5 after
    2 steps and the VAE."""
    before = call(pipe, output_type="pt")
    originals = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
                 for c in ("transformer", "text_encoder")}
    P.accelerate(pipe, tile=128, int8="w8a8")
    assert any(isinstance(m, Int8Linear) for m in pipe.transformer.modules())
    assert any(isinstance(m, Int8Embedding) for m in pipe.text_encoder.modules())
    save_pretrained_offline(pipe, tmp_path)
    for comp in ("transformer", "text_encoder"):
        saved = saved_tensors(tmp_path, comp)
        assert not [k for k in saved if k.endswith("weight_scale")]
        assert all(t.is_floating_point() for t in saved.values()), comp
        assert set(saved) <= set(originals[comp])
        assert all(torch.equal(t, originals[comp][k]) for k, t in saved.items()), comp
    after = call(reload(tmp_path), output_type="pt")
    assert after.shape == before.shape and rel_err(after, before) < 1e-5


def test_save_without_originals_writes_dequantized_floats(pipe, tmp_path):
    """keep_original_weights=False: the dequantized weights, with a warning; the reloaded float pipeline computes
    what the int8 one did up to the activation rounding of W8A8 (the weights are the same numbers)."""
    P.accelerate(pipe, tile=128, int8="w8a16", keep_original_weights=False)
    acc = call(pipe)
    with pytest.warns(UserWarning, match="dequantized"):
        save_pretrained_offline(pipe, tmp_path)
    tr = saved_tensors(tmp_path, "transformer")
    q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert tr["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float32
    assert torch.equal(tr["transformer_blocks.0.attn1.to_q.weight"], q.dequantized_weight(torch.float32))
    re = reload(tmp_path)
    P.accelerate(re, tile=128, int8=None, text_encoder_int8=False)
    # w8a16 computes x @ (w_i8 * s) as (x @ w_i8) * s: the same products, rounded in another order (fp32)
    assert rel_err(call(re), acc) < 1e-4


def test_load_float_state_dict_into_accelerated_model_requantizes(pipe):
    fresh = tiny_pipeline()
    fresh.set_progress_bar_config(disable=True)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with torch.no_grad():  # make `fresh` a different model, then load pipe's float weights into its int8 layers
        for p in fresh.transformer.parameters():
            p.add_(0.01)
    P.accelerate(pipe, tile=128, int8="w8a8", text_encoder_int8=False)
    P.accelerate(fresh, tile=128, int8="w8a8", text_encoder_int8=False)
    fresh.transformer.load_state_dict(state)
    assert torch.equal(call(fresh), call(pipe))
    # ... and the kept originals follow: what it saves is the float state it was given
    assert all(torch.equal(v, state[k]) for k, v in fresh.transformer.state_dict().items())


# --------------------------------------------------------------------------------------------- .to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_dtype_after_accelerate_keeps_scales_fp32(pipe, dtype):
    # baseline: how far the same cast moves the float (no int8) accelerated pipeline
    plain = tiny_pipeline()
    plain.set_progress_bar_config(disable=True)
    P.accelerate(plain, tile=128, int8=None, text_encoder_int8=False)
    plain_ref = call(plain)
    base = rel_err(call(plain.to(dtype)), plain_ref)
    P.accelerate(pipe, tile=128, int8="w8a8")
    ref = call(pipe)
    pipe.to(dtype)
    scales = [m.weight_scale for m in list(pipe.transformer.modules()) + list(pipe.text_encoder.modules())
              if isinstance(m, (Int8Linear, Int8Embedding))]
    assert scales and all(s.dtype == torch.float32 for s in scales)
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.float_dtype == dtype
    out = call(pipe)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # The cast moves W8A8 by the cast's own error plus re-rounded activations: values that move by a half-precision
    # step flip int8 levels, an error of the size of W8A8's quantization noise (measured: fp32 W8A8 vs float).
    q_noise = rel_err(ref, plain_ref)
    print(f"{dtype}: w8a8 moved {rel_err(out, ref):.3g}; float moved {base:.3g}; w8a8 noise {q_noise:.3g}")
    assert rel_err(out, ref) <= 2 * (base + q_noise)
    # the state dict follows the cast (what save_pretrained writes after pipe.to(dtype))
    assert pipe.transformer.state_dict()["transformer_blocks.0.attn1.to_q.weight"].dtype == dtype
    P.restore(pipe)
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.dtype == dtype


# ---------------------------------------------------------------------------------- fused QKV, processors


def attn1_processors(tr):
    return [v for k, v in tr.attn_processors.items() if k.endswith("attn1.processor")]


@pytest.mark.parametrize("int8", [None, "w8a8"], ids=["float", "w8a8"])
def test_fuse_qkv_projections_keeps_tiling(pipe, int8):
    P.accelerate(pipe, tile=128, int8=int8, text_encoder_int8=False)
    before = call(pipe)
    pipe.transformer.fuse_qkv_projections()
    assert all(isinstance(p, CrossTileAttnProcessor) for p in attn1_processors(pipe.transformer))
    assert pipe.transformer.transformer_blocks[0].attn1.fused_projections
    if int8:
        assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_qkv, Int8Linear)
    fused = call(pipe)
    # float: one [3C, C] GEMM sums like three (per output column); int8: the same integers and scales
    assert rel_err(fused, before) < 1e-4
    pipe.transformer.unfuse_qkv_projections()
    assert all(isinstance(p, CrossTileAttnProcessor) for p in attn1_processors(pipe.transformer))
    assert torch.equal(call(pipe), before)


def test_set_default_attn_processor_keeps_tiling(pipe):
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    before = call(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.transformer.set_default_attn_processor()
        pipe.transformer.set_attn_processor(AttnProcessor2_0())
    assert all(isinstance(p, CrossTileAttnProcessor) for p in attn1_processors(pipe.transformer))
    assert torch.equal(call(pipe), before)


def test_custom_processor_warns_and_is_used(pipe):
    class Mine(AttnProcessor2_0):
        calls = 0

        def __call__(self, *a, **k):
            Mine.calls += 1
            return super().__call__(*a, **k)

    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    with pytest.warns(UserWarning, match="whole canvas"):
        pipe.transformer.set_attn_processor(Mine())
    call(pipe, steps=1)
    assert Mine.calls > 0


# -------------------------------------------------------------------------------------- shared components


def test_second_pipeline_on_the_same_components(pipe):
    P.accelerate(pipe, tile=128, int8="w8a8")
    ref = call(pipe)
    sigma = PixArtSigmaPipeline(**pipe.components)
    sigma.set_progress_bar_config(disable=True)
    P.accelerate(sigma, tile=128, int8="w8a8")  # same settings: joins the transformer's one state
    assert P.state(sigma) is P.state(pipe)
    # Sigma encodes 300 tokens, Alpha 120: the tiny tokenizer pads both, masks agree, so the image is the same
    out = sigma(PROMPT, width=W, height=H, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=120,
                generator=torch.Generator().manual_seed(0), output_type="latent", clean_caption=False).images
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="other settings"):
        P.accelerate(sigma, mode="multidiffusion", int8="w8a8")
    P.restore(sigma)  # through either pipeline: both are restored
    assert type(pipe) is PixArtAlphaPipeline and type(sigma) is PixArtSigmaPipeline
    assert not any(isinstance(m, Int8Linear) for m in pipe.transformer.modules())
    assert "decode" not in pipe.vae.__dict__


def test_saved_config_names_the_plain_classes(pipe, tmp_path):
    P.accelerate(pipe, tile=128, int8="w8a8")
    save_pretrained_offline(pipe, tmp_path)
    with open(tmp_path / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "PixArtAlphaPipeline"
    with open(tmp_path / "transformer" / "config.json") as f:
        assert json.load(f)["_class_name"] == "PixArtTransformer2DModel"


@pytest.mark.parametrize("gs", [0.0, 3.0], ids=["nocfg", "cfg"])
def test_generate_with_a_list_of_prompts_equals_pipe_call(pipe, gs):
    prompts = ["a red house by the lake", "a cat"]
    P.accelerate(pipe, tile=128, int8=None, text_encoder_int8=False)
    ours = P.generate(pipe, prompts, width=W, height=H, steps=2, seed=0, guidance_scale=gs, output_type="latent",
                      progress=False, fused_step=False)
    theirs = pipe(prompts, width=W, height=H, num_inference_steps=2, guidance_scale=gs, output_type="latent",
                  generator=torch.Generator().manual_seed(0), clean_caption=False).images
    f = pipe.vae_scale_factor
    assert ours.shape == (2, 4, H // f, W // f)
    assert torch.equal(ours, theirs)
