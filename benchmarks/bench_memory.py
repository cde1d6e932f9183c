"""Full-size memory at 1024²: T5-XXL encoder + PixArt-XL-2 transformer + SD VAE, synthetic weights.

Each configuration runs in its own process (peak RSS = ru_maxrss of that process) and does what generation does
with the text encoder kept resident: encode a 120-token prompt, run the transformer on a 1024² latent
(4096 tokens; peak memory is the same in every LCM step, so one step is timed), decode with the VAE (tiled_decode, one 512² tile
at a time, so its activations stay bounded). Configurations:
  bf16  : everything bf16
  int8  : T5 weight-only int8 (w8a16), transformer W8A8 (PixArt's sensitive layers kept bf16), VAE bf16
Weights are synthetic (no checkpoint can be downloaded here) and are quantized layer by layer as they are made,
so the int8 run never holds a bf16 copy of T5. quick=True runs scaled-down configs of the same code.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
T5_QUICK = dict(T5_XXL, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8)
PIXART_XL = dict(sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                 out_channels=8, caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single",
                 num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
                 use_additional_conditions=False)
PIXART_QUICK = dict(PIXART_XL, sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                    caption_channels=256, cross_attention_dim=32)
VAE_SD = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
VAE_QUICK = dict(VAE_SD, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _materialize(module: torch.nn.Module, dtype: torch.dtype, after_leaf=None) -> None:
    """Give a meta-device module synthetic N(0, 0.02)-like weights, leaf by leaf (bounded extra memory).

    Values come from one random pool, tiled: random enough for memory/speed work and fast on 2 cores."""
    pool = torch.randn(1 << 22) * 0.02
    # Names, not modules: a list of the modules themselves would keep every replaced bf16 layer alive.
    for name in [n for n, _ in module.named_modules()]:
        leaf = module.get_submodule(name)
        tensors = list(leaf.parameters(recurse=False)) + list(leaf.buffers(recurse=False))
        if not any(t.is_meta for t in tensors):
            continue
        leaf.to_empty(device="cpu", recurse=False)
        for p in list(leaf.parameters(recurse=False)) + [b for b in leaf.buffers(recurse=False)
                                                          if b.is_floating_point()]:
            flat = p.data.view(-1)
            for s in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - s)
                flat[s : s + n].copy_(pool[:n])
            p.data = p.data.to(dtype)
        if after_leaf is not None:
            after_leaf(name, leaf)
        del leaf


def measure_config(config: str, quick: bool) -> dict:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from tiled_diffusion.int8 import Int8Linear, PIXART_KEEP_HIGH_PRECISION, _matches
    from tiled_diffusion.vae import tiled_decode

    torch.manual_seed(0)
    int8 = config == "int8"
    dt = torch.bfloat16
    row = {"config": config}
    stages = {}

    t = time.perf_counter()
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**(T5_QUICK if quick else T5_XXL)))

    def q_t5(name, leaf):  # weight-only int8 as each layer is made
        if int8 and type(leaf) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(t5.get_submodule(parent), child, Int8Linear.from_linear(leaf, "w8a16"))

    _materialize(t5, dt, q_t5)
    t5.eval()
    with torch.no_grad():
        ids = torch.randint(0, 32000, (1, 120))
        text = t5(input_ids=ids).last_hidden_state  # [1, 120, d_model]
    stages["text_encoder_s"] = time.perf_counter() - t
    row["rss_after_text_gb"] = _rss_gb()

    t = time.perf_counter()
    pcfg = PIXART_QUICK if quick else PIXART_XL
    with torch.device("meta"):
        tr = PixArtTransformer2DModel(**pcfg)

    def q_tr(name, leaf):
        if int8 and type(leaf) is torch.nn.Linear and not _matches(name, PIXART_KEEP_HIGH_PRECISION):
            parent, _, child = name.rpartition(".")
            setattr(tr.get_submodule(parent), child, Int8Linear.from_linear(leaf, "w8a8"))

    _materialize(tr, dt, q_tr)
    for b in tr.buffers():
        if b.is_meta:
            raise RuntimeError("unexpected meta buffer")
    tr.eval()
    side = pcfg["sample_size"]
    row["size"] = f"{side * 8}²"
    with torch.no_grad():
        latents = torch.randn(1, 4, side, side, dtype=dt)
        cond = text.to(dt)
        if cond.shape[-1] != pcfg["caption_channels"]:
            cond = cond[..., : pcfg["caption_channels"]]
        eps = tr(latents, encoder_hidden_states=cond, timestep=torch.tensor([999]),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    stages["transformer_step_s"] = time.perf_counter() - t
    row["rss_after_transformer_gb"] = _rss_gb()

    t = time.perf_counter()
    with torch.device("meta"):
        vae = AutoencoderKL(**(VAE_QUICK if quick else VAE_SD))
    _materialize(vae, dt)
    vae.eval()
    with torch.no_grad():
        z = eps[:, :4].contiguous()
        image = tiled_decode(vae, z, tile=min(64, side), overlap=min(16, side // 4), tile_batch=1)
    stages["vae_decode_s"] = time.perf_counter() - t
    assert torch.isfinite(image.float()).all(), "synthetic run produced non-finite pixels"
    row["image"] = "x".join(str(s) for s in image.shape[-2:])
    row["peak_rss_gb"] = _rss_gb()
    row.update(stages)
    return row


def suite(quick: bool) -> list[dict]:
    rows = []
    for config in ("bf16", "int8"):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), config] + (["--quick"] if quick else []),
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"memory benchmark {config} failed (exit code {r.returncode}):\n{r.stderr[-4000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_gb"]
    for r in rows:
        r["vs_bf16"] = r["peak_rss_gb"] / base
    return rows


def test_memory_quick():
    rows = suite(quick=True)
    assert [r["config"] for r in rows] == ["bf16", "int8"]
    assert all(r["peak_rss_gb"] > 0 for r in rows)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(measure_config(sys.argv[1], "--quick" in sys.argv)))
