"""The built-in tiny PixArt model (`--model tiny`): the quality lab's model, trained here and shipped in the package.

A PixArtAlphaPipeline of the same architecture family as PixArt-α/δ (PixArtTransformer2DModel with
ada_norm_single, T5 encoder, AutoencoderKL with an 8x downsampling, LCMScheduler with PixArt-δ's schedule), small
enough for CPU tests, with weights trained on the lab's procedural world (`tiled_diffusion/lab`: world.py,
train.py; the configs live in lab/models.py): it draws the world's four scene families from their captions
(`lab.world.CAPTIONS`, e.g. "a blue ocean") at its 128-px training size and beyond. The trained folder is
`tiled_diffusion/lab/tiny_model` (safetensors), loaded offline; retrain with
`python -m tiled_diffusion.lab.train --out DIR` and copy DIR/model there.

Tokenizer: a `tokenizers` WordLevel model over a small fixed vocabulary (unknown words -> <unk>), wrapped in
T5TokenizerFast so PixArtAlphaPipeline.encode_prompt works unchanged (no hub access). The text encoder is a tiny
T5 with seeded random weights (`SEED`), frozen during training: the transformer's caption projection learned to
read its embeddings.
"""
from __future__ import annotations

import string

import torch

SEED = 1234  # the tiny T5's weights (frozen in training, so the shipped ones are exactly this draw)
SAMPLE_SIZE = 16  # latent pixels: the model's base image is 128² px (lab.models.TRAIN_SIZE)
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
    """The tiny model's PixArtTransformer2DModel built from its config (random init; `overrides` change it)."""
    from .lab.models import build_transformer

    return build_transformer(**overrides)


def tiny_vae():
    """The tiny model's AutoencoderKL built from its config (random init)."""
    from .lab.models import build_vae

    return build_vae()


def tiny_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_scheduler():
    """PixArt-δ's LCMScheduler (linear betas 1e-4..0.02, ε-prediction): the schedule the tiny model was trained on."""
    from .lab.models import build_scheduler

    return build_scheduler()


def tiny_pipeline(device="cpu", dtype=torch.float32):
    """The trained tiny PixArtAlphaPipeline (lab/tiny_model, offline) on `device` in `dtype`.

    Every call returns fresh modules (callers accelerate and quantize them in place). The global RNG state is
    left untouched.
    """
    from .lab.models import load_pipeline

    with torch.random.fork_rng(devices=[]):
        pipe = load_pipeline()
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

