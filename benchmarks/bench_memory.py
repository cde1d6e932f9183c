"""Full-size memory at 1024²: T5-XXL encoder + PixArt-XL-2 transformer + SD VAE, synthetic weights.

Each configuration runs in its own process (peak RSS = ru_maxrss of that process) and does what generation does
with the text encoder kept resident: encode a 120-token prompt, run the transformer on a 1024² latent
(4096 tokens; peak memory is the same in every LCM step, so one step is timed), decode with the VAE (tiled_decode, one 512² tile
at a time, so its activations stay bounded). Configurations:
  bf16  : everything bf16
  int8  : what `accelerate(..., keep_original_weights=False)` leaves: T5 weight-only int8 (w8a16 linears and an
          int8 token table), transformer W8A8 holding only the CPU kernel's packed weights (PixArt's sensitive
          layers kept bf16), VAE bf16
Weights are synthetic (no checkpoint can be downloaded here) and are quantized layer by layer as they are made,
so the int8 run never holds a bf16 copy of T5 (tiled_diffusion.pipeline.loading does the same for a real checkpoint).
T5's `shared` and `encoder.embed_tokens` are one table, as in a loaded checkpoint.
The suite also writes the same synthetic pipeline as a diffusers folder (bf16 safetensors, T5 sharded) and runs
`tiled-diffusion generate --model FOLDER` on it in a fresh process: the product's own peak RSS (streaming int8
load, accelerate, encode, free T5, denoise, tiled decode) with its per-stage timings. quick=True runs scaled-down
configs of the same code. Besides the peak, each row reports the RSS right after the imports and the bytes of the
models' tensors, so that peak - imports - models = activations and transients.
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


def _tensor_gb(module: torch.nn.Module) -> float:
    from tiled_diffusion.model.int8 import module_bytes

    return module_bytes(module) / 2**30


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

    from tiled_diffusion.model.int8 import Int8Embedding
    from tiled_diffusion.model.int8 import Int8Linear
    from tiled_diffusion.model.int8 import PIXART_KEEP_HIGH_PRECISION
    from tiled_diffusion.model.int8 import _matches
    from tiled_diffusion.model.int8 import replace_module
    from tiled_diffusion.cli.generate import release_freed_memory
    from tiled_diffusion.vae.banded import tiled_decode

    torch.manual_seed(0)
    int8 = config == "int8"
    dt = torch.bfloat16
    row = {"config": config, "rss_imports_gb": _rss_gb()}
    stages = {}

    t = time.perf_counter()
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**(T5_QUICK if quick else T5_XXL)))
    t5.encoder.embed_tokens = t5.shared  # one table, made once (meta init leaves two tied Parameters)

    def q_t5(name, leaf):  # weight-only int8 as each layer is made
        if int8 and type(leaf) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(t5.get_submodule(parent), child, Int8Linear.from_linear(leaf, "w8a16"))
        if int8 and type(leaf) is torch.nn.Embedding:
            replace_module(t5, leaf, Int8Embedding.from_embedding(leaf))

    _materialize(t5, dt, q_t5)
    release_freed_memory()  # after each build, as generate does after each load: the float layers left holes
    t5.eval()
    with torch.no_grad():
        ids = torch.randint(0, 32000, (1, 120))
        text = t5(input_ids=ids).last_hidden_state  # [1, 120, d_model]
    stages["text_encoder_s"] = time.perf_counter() - t
    release_freed_memory()  # between stages, as generate does
    row["rss_after_text_gb"] = _rss_gb()

    t = time.perf_counter()
    pcfg = PIXART_QUICK if quick else PIXART_XL
    with torch.device("meta"):
        tr = PixArtTransformer2DModel(**pcfg)

    def q_tr(name, leaf):
        if int8 and type(leaf) is torch.nn.Linear and not _matches(name, PIXART_KEEP_HIGH_PRECISION):
            parent, _, child = name.rpartition(".")
            setattr(tr.get_submodule(parent), child, Int8Linear.from_linear(leaf, "w8a8").pack_only_())

    _materialize(tr, dt, q_tr)
    release_freed_memory()
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
    row["t5_gb"], row["transformer_gb"] = _tensor_gb(t5), _tensor_gb(tr)
    release_freed_memory()

    t = time.perf_counter()
    with torch.device("meta"):
        vae = AutoencoderKL(**(VAE_QUICK if quick else VAE_SD))
    _materialize(vae, dt)
    release_freed_memory()
    row["vae_gb"] = _tensor_gb(vae)
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


def measure_vae(tile: int, overlap: int, quick: bool) -> dict:
    """The SD VAE (bf16, synthetic) alone: `tiled_decode` of the 1024² canvas with one tile at a time; RSS
    increase over the built VAE (the decode's own working memory)."""
    from diffusers import AutoencoderKL

    from tiled_diffusion.vae.banded import tiled_decode

    torch.manual_seed(0)
    with torch.device("meta"):
        vae = AutoencoderKL(**(VAE_QUICK if quick else VAE_SD))
    _materialize(vae, torch.bfloat16)
    side = 32 if quick else 128
    z = torch.randn(1, 4, side, side, dtype=torch.bfloat16)
    base, t = _rss_gb(), time.perf_counter()
    with torch.no_grad():
        tiled_decode(vae.eval(), z, tile=tile, overlap=overlap)
    return {"config": f"VAE decode, tile {tile} overlap {overlap} (latent px)", "size": f"{side * 8}²",
            "decode_s": time.perf_counter() - t, "decode_rss_gb": _rss_gb() - base}


def write_synthetic_folder(path: str, quick: bool) -> str:
    """A diffusers PixArt-α folder with synthetic bf16 weights (full size unless quick), T5 in 2 GB shards like
    the released checkpoints, the tiny offline tokenizer and the tiny LCM scheduler: what a user's local folder
    looks like to `tiled-diffusion generate --model PATH` (with ~10.7 GB of weights at full size)."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from tiled_diffusion.tiny import save_pretrained_offline
    from tiled_diffusion.tiny import tiny_scheduler
    from tiled_diffusion.tiny import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**(T5_QUICK if quick else T5_XXL)))
        tr = PixArtTransformer2DModel(**(PIXART_QUICK if quick else PIXART_XL))
        vae = AutoencoderKL(**(VAE_QUICK if quick else VAE_SD))
    t5.encoder.embed_tokens = t5.shared
    for m in (t5, tr, vae):
        _materialize(m, torch.bfloat16)
    pipe = PixArtAlphaPipeline(tokenizer=tiny_tokenizer(), text_encoder=t5.eval(), transformer=tr.eval(),
                               vae=vae.eval(), scheduler=tiny_scheduler())
    save_pretrained_offline(pipe, path, max_shard_size="2GB")
    return path


def generate_row(quick: bool, folder: str) -> dict:
    """`tiled-diffusion generate --model folder` at 1024² (256² quick), 4 steps, int8 defaults, in a fresh
    process; its --json report carries the per-stage timings and the process's peak RSS."""
    side = 256 if quick else 1024
    out = os.path.join(folder, "bench.png")
    js = os.path.join(folder, "bench.json")
    cmd = [sys.executable, "-c", "import sys; from tiled_diffusion.cli.commands import main; sys.exit(main(sys.argv[1:]))",
           "generate", "--model", folder, "--prompt", "a lighthouse at dawn", "--size", f"{side}x{side}",
           "--steps", "4", "--seed", "0", "--out", out, "--json", js]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"generate failed (exit code {r.returncode}):\n{r.stderr[-4000:]}")
    with open(js) as f:
        rep = json.load(f)
    return {"config": f"generate --model PATH ({rep['int8']})", "size": f"{side}²", "mode": rep["mode"],
            "peak_rss_gb": rep["memory"]["peak_rss_gb"], **rep["timings"]}


def _run_config(config: str, quick: bool, *extra: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), config, *extra] + (["--quick"] if quick else []),
                       capture_output=True, text=True, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(f"memory benchmark {config} failed (exit code {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def suite(quick: bool) -> list[dict]:
    rows = [_run_config(config, quick) for config in ("bf16", "int8")]
    base = rows[0]["peak_rss_gb"]
    for r in rows:
        r["vs_bf16"] = r["peak_rss_gb"] / base
    import tempfile

    with tempfile.TemporaryDirectory(prefix="td_synthetic_pixart_") as folder:
        _run_config("folder", quick, folder)  # a child process: the bf16 weights it makes leave with it
        rows.append(generate_row(quick, folder))
    return rows


def test_memory_quick():
    """`bench --suite memory --quick`, table and schema included: CI's bench stage skips this suite because it
    runs here."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import harness  # benchmarks/harness.py (its folder on sys.path: lines above)

    rows = suite(quick=True)
    assert [r["config"] for r in rows][:2] == ["bf16", "int8"]
    assert rows[2]["config"].startswith("generate") and rows[2]["decode_s"] > 0
    assert all(r["peak_rss_gb"] > 0 for r in rows)
    harness.print_table("memory (quick)", rows)
    normal = harness.normalize_rows(rows, "memory")
    assert len({r["case"] for r in normal}) == len(rows)  # compare joins rows on `case`: each one distinct


if __name__ == "__main__":
    # bench_memory.py bf16|int8 [--quick]: one configuration, text encoder resident
    # bench_memory.py folder DIR [--quick]: write the synthetic diffusers folder
    # bench_memory.py generate DIR [--quick]: `tiled-diffusion generate --model DIR` in a child process
    # bench_memory.py vae TILE OVERLAP [--quick]: the tiled VAE decode alone
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    quick = "--quick" in sys.argv
    if sys.argv[1] == "folder":
        print(json.dumps({"folder": write_synthetic_folder(sys.argv[2], quick)}))
    elif sys.argv[1] == "vae":
        print(json.dumps(measure_vae(int(sys.argv[2]), int(sys.argv[3]), quick)))
    elif sys.argv[1] == "generate":
        print(json.dumps(generate_row(quick, sys.argv[2])))
    else:
        print(json.dumps(measure_config(sys.argv[1], quick)))
