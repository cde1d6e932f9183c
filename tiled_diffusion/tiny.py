"""The built-in tiny PixArt test model: built from configs with seeded random weights, fully offline.

Same architecture family as PixArt-α/δ (PixArtTransformer2DModel with ada_norm_single, T5 encoder,
AutoencoderKL with an 8x downsampling, LCMScheduler), scaled down so it builds in well under a second and runs
1024² canvases on a CPU. The weights are random, so images are structured noise: the model exists to test the
plumbing (tiling, positional embeddings, schedulers, module swaps), not image quality.

Tokenizer: a `tokenizers` WordLevel model over a small fixed vocabulary (unknown words -> <unk>), wrapped in
T5TokenizerFast so PixArtAlphaPipeline.encode_prompt works unchanged (no hub access).
"""
from __future__ import annotations

import string

import torch

SEED = 1234
SAMPLE_SIZE = 32  # latent pixels: the model's base image is 256² px
TEXT_DIM = 32
_WORDS = ("a photo of the an and in on with at cat dog city mountain lake forest sky river house tree car red "
          "blue green yellow black white big small old new night day sunset ocean beach snow painting "
          "portrait landscape detailed high quality").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in list(_WORDS) + list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=120)


def tiny_transformer(**overrides):
    from diffusers import PixArtTransformer2DModel

    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=16, sample_size=SAMPLE_SIZE, patch_size=2, caption_channels=TEXT_DIM,
               norm_num_groups=4, interpolation_scale=1)
    cfg.update(overrides)
    return PixArtTransformer2DModel(**cfg)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=256)


def tiny_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_scheduler():
    from diffusers import LCMScheduler

    # PixArt-δ's schedule has beta_end=0.02 (alpha_bar(999) ≈ 4e-5): x0 = (x - σ·ε)/α amplifies any ε that is not
    # the true noise ~156x, so a random model's images are amplified noise, identical in every mode. A gentler
    # schedule (alpha_bar(999) ≈ 0.35) keeps latents O(1) and lets the model's own (tile-dependent) output show
    # in the image, which is what seam measurements need. The scheduler arithmetic is the same code either way.
    return LCMScheduler(beta_start=1e-4, beta_end=0.002, beta_schedule="linear", prediction_type="epsilon",
                        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")


def tiny_pipeline(device="cpu", dtype=torch.float32, seed: int = SEED):
    """A PixArtAlphaPipeline with tiny random (deterministic for a given seed) weights, on `device` in `dtype`.

    The global RNG state is left untouched.
    """
    from diffusers import PixArtAlphaPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer))
        transformer = tiny_transformer().eval()
        vae = tiny_vae().eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    # Modules built from configs have no `_keep_in_fp32_modules` to honour; diffusers warns about that on every
    # cast, so the warning is muted for this one call.
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return pipe.to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


def save_pretrained_offline(pipe, path, **save_kw) -> None:
    """`pipe.save_pretrained(path)` for a pipeline that carries the tiny tokenizer, loadable back offline.

    As saved, the tokenizer does not round-trip: save_pretrained records it as a T5Tokenizer, and transformers 5's
    T5Tokenizer always builds a SentencePiece-style Unigram model, which cannot hold the WordLevel vocabulary.
    Its tokenizer.json is complete, so the folder is relabelled to the generic PreTrainedTokenizerFast, which
    loads that file as it is (same ids, masks and padding).
    """
    import json
    import os

    pipe.save_pretrained(str(path), **save_kw)
    for file, key, value in (("model_index.json", "tokenizer", ["transformers", "PreTrainedTokenizerFast"]),
                             (os.path.join("tokenizer", "tokenizer_config.json"), "tokenizer_class",
                              "PreTrainedTokenizerFast")):
        full = os.path.join(str(path), file)
        with open(full) as f:
            cfg = json.load(f)
        cfg[key] = value
        with open(full, "w") as f:
            json.dump(cfg, f, indent=2)

