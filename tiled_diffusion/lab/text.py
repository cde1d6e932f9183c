"""The lab model's text side: the frozen, seeded tiny T5 and its word-level tokenizer (the transformer's caption
projection learned to read this T5's embeddings, so it is part of the model), and saving a pipeline that carries
them so that it loads back offline.

Tokenizer: a `tokenizers` WordLevel model over a small fixed vocabulary (unknown words -> <unk>), wrapped in
T5TokenizerFast so PixArtAlphaPipeline.encode_prompt works unchanged (no hub access). The text encoder is a tiny
T5 with seeded random weights (`SEED`), frozen during training.
"""
from __future__ import annotations

import json
import os
import string

from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

SEED = 1234  # the tiny T5's weights (frozen in training, so the shipped ones are exactly this draw)
TEXT_DIM = 32
_WORDS = ("a photo of the an and in on with at cat dog city mountain lake forest sky river house tree car red "
          "blue green yellow black white big small old new night day sunset ocean beach snow painting "
          "portrait landscape detailed high quality").split()


def tiny_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in list(_WORDS) + list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=120)


def tiny_text_encoder(vocab_size: int):
    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def save_pretrained_offline(pipe, path, **save_kw) -> None:
    """`pipe.save_pretrained(path)` for a pipeline that carries the tiny tokenizer, loadable back offline.

    As saved, the tokenizer does not round-trip: save_pretrained records it as a T5Tokenizer, and transformers 5's
    T5Tokenizer always builds a SentencePiece-style Unigram model, which cannot hold the WordLevel vocabulary.
    Its tokenizer.json is complete, so the folder is relabelled to the generic PreTrainedTokenizerFast, which
    loads that file as it is (same ids, masks and padding).
    """
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
