"""Train the lab model on the procedural world: `python -m tiled_diffusion.lab.train --out DIR`.

Stages (each resumable: rerun the same command and it continues from the last checkpoint in DIR/ckpt):

1. data     render `--images` world crops of --data-size² px (default 160: every bucket fits; families in turn,
            a fresh world seed and a random offset each), cached as uint8 in DIR/cache.
2. vae      AutoencoderKL (lab/models.py) on random 64-px crops with flips: L1 + L1 of the image gradients (keeps
            edges) + a small KL. Convolutions and GroupNorm make it size-agnostic. --vae-from FOLDER reuses a
            trained lab VAE instead (the world is unchanged, so the shipped one serves); --vae-init FOLDER
            continues training one. --vae-noise 0 decodes the posterior mean while training: measured
            2026-12-06 (NOTES issue 19), the posterior's noise (std ≈ 0.3 against a latent std ≈ 2) taught the
            decoder to ignore the latents' fine detail: forest trunks came back as leaves (trunk share of
            reconstructions 0 of the truth's) until the noise was removed (0.26 after 1500 steps). --vae-arch
            with three block_out_channels trains an f4 VAE: measured 2026-12-06 (NOTES issue 19), f8 VAEs of
            either width tried decode the lit windows as building grey (window share 0), the f4 one carries them
            (0.89 of the truth's, 36.6 dB); its latents are 2× the side, so the DiT takes --arch patch_size 4.
3. latents  every training image encoded once (posterior mean); the VAE's scaling_factor = 1 / latent std.
4. dit      PixArtTransformer2DModel, ε-prediction (--prediction v_prediction: v, see as_eps) on the LCM
            scheduler's schedule (linear betas 1e-4..0.02, t uniform in [0, 1000)), conditioned on the caption
            embeddings of the frozen, seeded tiny T5 (10% of captions dropped to "" so classifier-free guidance is
            possible). An EMA of the weights is what ships. Batches are random latent windows of one shape per step, drawn from lab/models.BUCKETS
            (PixArt-α's multi-aspect buckets, in f8 latent px, doubled for an f4 VAE; those that fit the cached
            latents), so --data-size above TRAIN_SIZE gives aspect ratios and larger token grids (all of them
            from 160 px; at 128 only the square one fits, as for lab models up to v1.3). --pos-jitter C trains
            half the steps with the positions a cross_tile window has on a canvas up to C× the side
            (CanvasPositions). --field-scale F makes half the batches F× the side with 1/F² the rows, their
            self-attention the canvas forward's token-centred windows of the training field (WindowedFields), so
            the model learns fields where every token's window differs from its neighbour's, as on a large canvas.
            --arch overrides the transformer's config; --dit-init FOLDER starts from a
            trained folder's transformer, deepened by identity blocks or re-cut to a finer patch (grown_from).
            --loss-weight v|x0 (--loss-weight-cap γ) weights the ε-MSE per t as the v / x0 loss, capped at γ
            (`loss_weights`). Why (measured 2026-12-06, NOTES issue 19): with this schedule ᾱ(t > 700) ≈ 0, so the
            ε-loss there hardly depends on the image or caption, yet the LCM sampler's first step decides the
            scene family at t = 999, where x0(ε̂) amplifies ε̂'s error ~160×. v1.1 was trained with v weighting,
            γ 100 for 10k steps then γ 1000 for 4k: the teacher's x0(ε̂) at t = 999 from pure noise is classified
            as the caption's family for 86% of 64 samples (ε-loss, 4k steps: 47%), and 4-step samples at 1× read
            KID 0.40 vs v1's 0.67 (256 samples). Every later model keeps that loss; the shipped one's full recipe
            is in its lab_training.json ("vae_recipe", "dit_recipe"), its figures in NOTES (issue 19).
5. lcm      latent consistency distillation of the EMA ε-model (`stage_lcm`): 4 LCM steps of an un-distilled
            model draw the captions' mean colours, the distilled one draws structure (--lcm-steps 0 skips it).
            --lcm-guidance w distils the classifier-free-guided teacher (LCM's w; 1: conditional only).
6. export   a diffusers PixArtAlphaPipeline folder in DIR/model (safetensors; tokenizer loadable offline), plus
            DIR/model/lab_training.json (configs, steps, losses, times). The transformer and VAE weights are stored
            fp16 (models.py upcasts them on load: the figures are those of what ships). When stage 5 ran, the
            teacher (the EMA model it distilled) is kept beside the pipeline in DIR/model/teacher: diffusers
            loads only model_index.json's components, and --dit-init continues from the teacher, not from the
            consistency model (a continuation of the distilled network must first re-learn a teacher: measured
            2026-12-07, NOTES issue 19, 1200-2000 + 300 steps from v1.7's distilled network were ~6x worse at 1x).

Why one file of ~800 lines: it is one recipe, the six stages in the order they run, each resumable through the same
checkpoint helpers; split, a reader would follow one training run across files.

Everything is drawn from seeded torch.Generators whose states are checkpointed, so a resumed run continues the
same stream. Results are bitwise reproducible for a fixed thread count; other thread counts change float
reduction order only.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import PixArtAlphaPipeline

from ..model.positional import positional_embedding
from ..reference import neighborhood_axis_mask
from . import models, world
from .text import SEED, save_pretrained_offline, tiny_text_encoder, tiny_tokenizer

CROP = 64  # VAE training crop (px)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress:
    """Prints step, smoothed loss, seconds per step and the stage's ETA every `every` steps."""

    def __init__(self, name: str, total: int, start: int, every: int = 50):
        self.name, self.total, self.every = name, total, every
        self.t0, self.s0, self.loss = time.perf_counter(), start, None

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        if step % self.every == 0 or step == self.total:
            dt = (time.perf_counter() - self.t0) / max(1, step - self.s0)
            log(f"{self.name} {step}/{self.total} loss {self.loss:.4f} {dt:.3f} s/step "
                f"eta {dt * (self.total - step) / 60:.1f} min")


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(path: str, model, shadow, shadow_key: str, opt, g: torch.Generator) -> tuple[int, list]:
    """Load a stage's checkpoint into (model, its EMA/target `shadow`, optimizer, generator): (step, history),
    (0, []) when there is none."""
    if not os.path.exists(path):
        return 0, []
    st = torch.load(path, weights_only=False)
    model.load_state_dict(st["model"])
    shadow.load_state_dict(st[shadow_key])
    opt.load_state_dict(st["opt"])
    g.set_state(st["rng"])
    return st["step"], st["history"]


def _checkpoint(path: str, model, shadow, shadow_key: str, opt, g: torch.Generator, step: int, history) -> None:
    _atomic_save({"model": model.state_dict(), shadow_key: shadow.state_dict(), "opt": opt.state_dict(),
                  "rng": g.get_state(), "step": step, "history": history}, path)


def _start(name: str, path: str, model, shadow, shadow_key: str, lr: float, seed: int, steps: int):
    """A training stage's optimizer and generator, resumed from `path` when it exists: (opt, g, start, history)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start, history = _resume(path, model, shadow, shadow_key, opt, g)
    if 0 < start < steps:
        log(f"{name}: resuming at step {start}")
    return opt, g, start, history


def _record(prog, step: int, loss: torch.Tensor, history: list, every: int, steps: int, checkpoint) -> None:
    """After a training step: the progress line, the loss history (every 100 steps), a checkpoint (every `every`
    steps and at the last)."""
    prog.update(step, loss.item())
    if step % 100 == 0:
        history.append((step, prog.loss))
    if step % every == 0 or step == steps:
        checkpoint()


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------------------------- data


def stage_data(args, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = os.path.join(cache, "data.pt")
    if os.path.exists(path):
        d = torch.load(path)
        if d["images"].shape[-1] != args.data_size:  # the run's record (lab_training.json) must say what was used
            raise SystemExit(f"train: {path} holds {d['images'].shape[-1]}-px images, not --data-size "
                             f"{args.data_size}: pass that size or another --out")
        return d["images"], d["families"]
    n, size, chunk = args.images, args.data_size, 256
    fams = torch.arange(n) % len(world.FAMILIES)
    parts = []
    t0 = time.perf_counter()
    for c0 in range(0, n, chunk):
        part_path = os.path.join(cache, f"data_{c0:06d}.pt")
        if os.path.exists(part_path):
            parts.append(torch.load(part_path))
            continue
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + c0)
        imgs = []
        for i in range(c0, min(n, c0 + chunk)):
            img = world.random_crop(int(fams[i]), seed=args.seed * 100_000 + i, size=size, generator=g)
            imgs.append(((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        part = torch.stack(imgs)
        _atomic_save(part, part_path)
        parts.append(part)
        done = min(n, c0 + chunk)
        log(f"data {done}/{n} images ({(time.perf_counter() - t0) / 60:.1f} min)")
    images = torch.cat(parts)
    _atomic_save({"images": images, "families": fams}, path)
    for c0 in range(0, n, chunk):
        os.remove(os.path.join(cache, f"data_{c0:06d}.pt"))
    return images, fams


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------ vae


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    return dy.abs().mean() + dx.abs().mean()


def stage_vae(args, ckpt: str, images: torch.Tensor):
    path = os.path.join(ckpt, "vae.pt")
    torch.manual_seed(args.seed)
    if args.vae_from:  # reuse a trained lab VAE (a model folder): the VAE is size-agnostic and the world unchanged
        log(f"vae: loaded from {args.vae_from}")
        return models.load_vae(args.vae_from).eval(), []
    if args.vae_init:  # continue training a folder's VAE (its architecture; --vae-arch must not change it)
        vae = models.load_vae(args.vae_init)
        log(f"vae: initialised from {args.vae_init}")
    else:
        vae = models.build_vae(**(json.loads(args.vae_arch) if args.vae_arch else {}))
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    start, history = 0, []
    if os.path.exists(path):
        st = torch.load(path, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["rng"])
        start, history = st["step"], st["history"]
        if start >= args.vae_steps:
            return vae.eval(), history
        log(f"vae: resuming at step {start}")
    prog = Progress("vae", args.vae_steps, start)
    vae.train()
    n, size = images.shape[0], images.shape[-1]
    crop = min(args.vae_crop, size)
    for step in range(start + 1, args.vae_steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = _lr(step - 1, args.vae_steps, args.vae_lr, 100)
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        oy, ox = torch.randint(0, size - crop + 1, (2,), generator=g).tolist()
        x = _to_float(images[idx, :, oy:oy + crop, ox:ox + crop])
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        z = post.mean + args.vae_noise * post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + _grad_l1(rec, x) + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog.update(step, loss.item())
        if step % 100 == 0:
            history.append((step, prog.loss))
        if step % args.ckpt_every == 0 or step == args.vae_steps:
            _atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(), "step": step,
                          "history": history}, path)
    return vae.eval(), history


@torch.no_grad()
def stage_latents(cache: str, vae, images: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Posterior means of every image [N, 4, h, w] (unscaled), the scaling factor and the PSNR of a reconstruction
    check on the first 64 images."""
    path = os.path.join(cache, "latents.pt")
    if os.path.exists(path):
        d = torch.load(path)
        return d["latents"], d["scale"], d["psnr"]
    out = []
    for i in range(0, images.shape[0], 64):
        out.append(vae.encode(_to_float(images[i:i + 64])).latent_dist.mean)
        if (i // 64) % 8 == 0:
            log(f"latents {i + out[-1].shape[0]}/{images.shape[0]}")
    lat = torch.cat(out)
    scale = float(1.0 / lat.std())
    x = _to_float(images[:64])
    rec = vae.decode(lat[:64]).sample.clamp(-1, 1)
    psnr = float(10 * torch.log10(4.0 / (rec - x).pow(2).mean()))
    _atomic_save({"latents": lat, "scale": scale, "psnr": psnr}, path)
    log(f"latents: std {1 / scale:.3f} mean {lat.mean():.3f} -> scaling_factor {scale:.4f}; VAE PSNR {psnr:.2f} dB")
    return lat, scale, psnr


# ------------------------------------------------------------------------------------------------ dit


@torch.no_grad()
def caption_embeddings(texts) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, 120, 32] embeddings and [K, 120] masks of the frozen tiny T5, as PixArtAlphaPipeline.encode_prompt makes
    them (lower-cased, padded to 120 tokens, attention mask kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # the same draw order as tiny.tiny_pipeline: the tokenizer, then T5
        tok = tiny_tokenizer()
        te = tiny_text_encoder(len(tok))
    ids = tok([t.lower().strip() for t in texts], padding="max_length", max_length=120, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    return te(ids.input_ids, attention_mask=ids.attention_mask)[0], ids.attention_mask


def bucket_batch(x0_all: torch.Tensor, families: torch.Tensor, batch: int, buckets, g: torch.Generator,
                 field_scale: int = 1):
    """A training batch of latent crops of one aspect-ratio bucket (PixArt-α's multi-aspect training: every batch
    one shape, the shape drawn per step from `buckets`, (h, w) latent pixels, repeats weighting them): (x0 [B, 4,
    h, w], family [B]). field_scale F > 1: half the batches are F× the bucket's side with 1/F² the rows (the same
    tokens per step), which WindowedFields attends as the canvas forward does. Each row is an independent random
    window of a cached latent: the world is stationary, so a latent crop is a crop of the world (the VAE is
    convolutional; its border effects are those of a canvas's interior, which is what a tiled canvas asks for)."""
    h, w = buckets[int(torch.randint(0, len(buckets), (1,), generator=g))]
    if field_scale > 1 and torch.rand(1, generator=g).item() < 0.5:  # no draw at 1: old streams kept
        h, w, batch = h * field_scale, w * field_scale, max(1, batch // field_scale ** 2)
    n, _, H, W = x0_all.shape
    idx = torch.randint(0, n, (batch,), generator=g)
    oy = torch.randint(0, H - h + 1, (batch,), generator=g).tolist()
    ox = torch.randint(0, W - w + 1, (batch,), generator=g).tolist()
    x0 = torch.stack([x0_all[i, :, a:a + h, b:b + w] for i, a, b in zip(idx.tolist(), oy, ox)])
    return x0, families[idx]


def dit_arch(args, latents: torch.Tensor) -> dict:
    """The transformer's config overrides: --arch over a sample_size of the training size in the latents' own px
    (32 for an f4 VAE: the model's training field, which the canvas forward's windows are sized by)."""
    k = models.VAE_SCALE * latents.shape[-1] // args.data_size
    own = {"sample_size": models.TRAIN_SIZE // models.VAE_SCALE * k}
    return {**own, **(json.loads(args.arch) if args.arch else {})}


@torch.no_grad()
def grown_from(folder: str, num_layers: int | None = None, patch_size: int | None = None):
    """--dit-init: a trained lab folder's transformer (its teacher when the folder keeps one, else its shipped
    weights; ε channels only) grown to `num_layers` (default: its own depth), a multiple k of its depth: source
    block i becomes block i·k and the blocks between start as identities (the output projections of their
    self-attention, cross-attention and feed-forward are zero, so each adds nothing to the residual stream). The grown model computes the source's function exactly, so
    training starts from the trained model instead of from noise; its config (positions included) is the source's.

    `patch_size` q dividing the folder's p (finer tokens): the blocks are kept and the two ends re-cut (`_refined`),
    with interpolation_scale ×p/q so every token keeps the position of the spot it covers. Not exact (each token now
    sees a (p/q)²-th of its former area), but it starts from what the blocks learned instead of from noise."""
    sub = dit_source(folder)
    arch = models._arch(folder, sub, models.ARCH_KEYS)
    depth, p = arch["num_layers"], arch["patch_size"]
    num_layers = arch["num_layers"] = num_layers or depth
    q = arch["patch_size"] = patch_size or p
    src = {k: v.float() for k, v in models._read(folder, sub, "diffusion_pytorch_model.safetensors").items()}
    if num_layers % depth:
        raise SystemExit(f"--dit-init: num_layers {num_layers} is not a multiple of {folder}'s {depth} layers")
    if p % q:
        raise SystemExit(f"--dit-init: patch_size {q} does not divide {folder}'s patch_size {p}")
    k, c = num_layers // depth, models.TRAIN_OUT_CHANNELS
    for name in ("proj_out.weight", "proj_out.bias"):  # drop the exported zero σ half (models.with_sigma_channels)
        t = src[name]
        src[name] = t.reshape((p * p, -1) + t.shape[1:])[:, :c].reshape((p * p * c,) + t.shape[1:])
    if q != p:
        arch["interpolation_scale"] = arch["interpolation_scale"] * (p // q)  # exact for any scale: q | p
        src.update(_refined(src, p, q, c))
    tr = models.build_transformer(out_channels=c, **arch)
    sd = tr.state_dict()
    for name, v in src.items():
        if name.startswith("transformer_blocks."):
            _, i, rest = name.split(".", 2)
            name = f"transformer_blocks.{int(i) * k}.{rest}"
        sd[name] = v
    for i in range(num_layers):
        if i % k:
            for proj in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2"):
                sd[f"transformer_blocks.{i}.{proj}.weight"].zero_()
                sd[f"transformer_blocks.{i}.{proj}.bias"].zero_()
    tr.load_state_dict(sd)
    return tr, arch


def _refined(src: dict, p: int, q: int, c: int) -> dict:
    """The patch embedding and output projection of patch p re-cut for patch q | p, read as the p-model seen at
    (p/q)× zoom: a q-token's pixel (i, j) stands for the r × r block (r = p/q) of p-pixels it magnifies, so its input
    weight is that block's sum (a token on a field constant over the p-token it lies in embeds exactly as that p-token
    did), and its output rows are the block's mean (the p-token's prediction averaged over the pixel's area)."""
    r = p // q
    w = src["pos_embed.proj.weight"]  # [D, C_in, p, p]
    out = {"pos_embed.proj.weight": w.reshape(w.shape[0], w.shape[1], q, r, q, r).sum(dim=(3, 5))}
    for name in ("proj_out.weight", "proj_out.bias"):  # rows ordered (pixel row, pixel col, channel)
        t = src[name]
        t = t.reshape((q, r, q, r, c) + t.shape[1:]).mean(dim=(1, 3))
        out[name] = t.reshape((q * q * c,) + t.shape[3:])
    return out


def _buckets(args, latents: torch.Tensor, warn: bool = True):
    """lab/models.BUCKETS (f8 latent px) in the latents' own px: ×2 for an f4 VAE, so a bucket keeps its pixel size."""
    H, W = latents.shape[-2:]
    k = models.VAE_SCALE * W // args.data_size
    out = [(h * k, w * k) for h, w in models.BUCKETS if h * k <= H and w * k <= W] if args.buckets else []
    if warn and args.buckets and len(out) < len(models.BUCKETS):
        log(f"dit: warning: {len(models.BUCKETS) - len(out)} of {len(models.BUCKETS)} buckets do not fit "
            f"--data-size {args.data_size} and are dropped (all fit from {BUCKETS_PX} px)")
    side = models.TRAIN_SIZE // models.VAE_SCALE * k
    out = out or [(min(H, side), min(W, side))]
    f = args.field_scale
    if any(h * f > H or w * f > W for h, w in out):
        px = max(max(b) for b in out) * f * args.data_size // W
        raise SystemExit(f"train: --field-scale {f} makes fields of up to {px} px, larger than --data-size "
                         f"{args.data_size}")
    return out


BUCKETS_PX = max(max(b) for b in models.BUCKETS) * models.VAE_SCALE  # the data size every bucket fits in
LOSS_WEIGHTS = ("eps", "x0", "v")


def loss_weights(alphas_cumprod: torch.Tensor, kind: str, cap: float) -> torch.Tensor:
    """Per-timestep weights [T] of the ε-MSE that make it the loss of another parametrisation, capped at `cap` and
    normalised to mean 1 over the uniformly drawn t (so the learning rate keeps its meaning).

    With x0(ε̂) = (x_t − √(1−ᾱ)·ε̂)/√ᾱ and v = √ᾱ·ε − √(1−ᾱ)·x0, an ε error δ is an x0 error √((1−ᾱ)/ᾱ)·δ and a v
    error δ/√ᾱ: x0-MSE = ε-MSE / SNR, v-MSE = ε-MSE / ᾱ. "eps": 1 everywhere; "x0": min(1/SNR, cap) (→ 0 at low t);
    "v": min(1/ᾱ, cap) (≥ 1 everywhere: the ε-loss plus the x0 term). The cap keeps t ≈ 999, where 1/ᾱ ≈ 2·10⁴ on
    PixArt-δ's linear betas, from taking every gradient."""
    a = alphas_cumprod.double()
    w = {"eps": torch.ones_like(a), "x0": (1 - a) / a, "v": 1 / a}[kind].clamp(max=cap)
    return (w / w.mean()).float()


class CanvasPositions:
    """--pos-jitter C: on half of the steps, the batch's token crop carries the positions of a crop of a canvas c
    times larger per side (c log-uniform in [1, C], one c per step, one random offset per row), stretched onto the
    trained range as inference's default `canvas_stretched` does (model/positional.py). That is what a cross_tile
    window sees on a c²× canvas: the training size's content at c× the position density. A model trained at one
    density draws a fine speckle there instead of the world's shapes (measured, NOTES issue 19), as if the denser
    positions asked for smaller things.

    Installed as a forward hook on the transformers' patch embeddings that adds (canvas crop − own grid) to their
    output; `draw` sets the next forward's positions (None: the model's own)."""

    def __init__(self, max_scale: float, *transformers):
        self.max_scale, self.delta = float(max_scale), None
        pe = transformers[0].pos_embed
        self.dim, self.base, self.interp = pe.pos_embed.shape[-1], pe.base_size, pe.interpolation_scale
        self.patch = pe.patch_size
        self.hooks = [t.pos_embed.register_forward_hook(self._add) for t in transformers] if max_scale > 1 else []

    def _add(self, module, inputs, out):
        return out if self.delta is None else out + self.delta.to(out.dtype)

    def draw(self, latent_hw: tuple[int, int], batch: int, g: torch.Generator) -> None:
        self.delta = None
        if not self.hooks or torch.rand(1, generator=g).item() < 0.5:  # no draws without jitter: old streams kept
            return
        h, w = latent_hw[0] // self.patch, latent_hw[1] // self.patch
        c = math.exp(torch.rand(1, generator=g).item() * math.log(self.max_scale))
        ch, cw = max(h, round(h * c)), max(w, round(w * c))
        off = torch.stack([torch.randint(0, ch - h + 1, (batch,), generator=g),
                           torch.randint(0, cw - w + 1, (batch,), generator=g)], dim=1)
        kw = dict(base=self.base, interp=self.interp, device="cpu")
        crop = positional_embedding("canvas_stretched", self.dim, (ch, cw), (h, w), off, **kw)
        self.delta = crop - positional_embedding("canvas_stretched", self.dim, (h, w), (h, w), None, **kw)

    def remove(self) -> None:
        for hk in self.hooks:
            hk.remove()
        self.delta = None


class WindowedFields:
    """Self-attention (attn1) of a token field larger than the model's training field, as the CLI's default
    canvas forward attends it: each query sees the window of the training field's side centred on it (token-
    centred windows, stride one token, shifted inward at the border: reference.neighborhood_axis_mask, the op's own
    definition). A field no larger than the window keeps diffusers' full attention, which it equals. Why: a model
    trained only on fields its window covers has never seen a neighbour's window differ from its own, and on a
    16× canvas every token's does (--field-scale).

    Installed as the attn1 processors of the transformers; `set` gives the next forward's token field."""

    def __init__(self, *transformers):
        t = transformers[0]
        self.window = t.config.sample_size // t.config.patch_size
        self.mask = None
        self.attns = [b.attn1 for tr in transformers for b in tr.transformer_blocks]
        self.old = {id(a): a.processor for a in self.attns}
        for a in self.attns:
            a.set_processor(self)

    def set(self, latent_hw: tuple[int, int], patch: int) -> None:
        h, w = latent_hw[0] // patch, latent_hw[1] // patch
        if h <= self.window and w <= self.window:
            self.mask = None
            return
        my, mx = neighborhood_axis_mask(h, self.window), neighborhood_axis_mask(w, self.window)
        self.mask = (my[:, None, :, None] & mx[None, :, None, :]).reshape(h * w, h * w)  # raster query x key

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if self.mask is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.old[id(attn)](attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args,
                                      **kwargs)
        # PixArt's attn1 as AttnProcessor2_0 runs it: no q/k norms, group norm or residual inside the processor
        B, N, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(B, N, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).transpose(1, 2).reshape(B, N, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def remove(self) -> None:
        for a in self.attns:
            a.set_processor(self.old[id(a)])
        self.mask = None


def stage_dit(args, ckpt: str, latents: torch.Tensor, families: torch.Tensor, scale: float):
    path = os.path.join(ckpt, "dit.pt")
    torch.manual_seed(args.seed + 2)
    arch = dit_arch(args, latents)
    if args.dit_init:
        # --arch's depth and patch, else the folder's
        tr, arch = grown_from(args.dit_init, arch.get("num_layers"), arch.get("patch_size"))
    else:
        tr = models.build_transformer(out_channels=models.TRAIN_OUT_CHANNELS, **arch)
    ema = models.build_transformer(out_channels=models.TRAIN_OUT_CHANNELS, **arch)
    ema.load_state_dict(tr.state_dict())
    ema.requires_grad_(False)
    opt, g, start, history = _start("dit", path, tr, ema, "ema", args.dit_lr, args.seed + 3, args.dit_steps)
    if start >= args.dit_steps:
        return ema.eval(), history
    embeds, masks = caption_embeddings(list(world.CAPTIONS) + [""])
    ab = models.build_scheduler().alphas_cumprod.float()
    weight = loss_weights(ab, args.loss_weight, args.loss_weight_cap)
    x0_all = latents * scale
    buckets = _buckets(args, latents)
    log(f"dit: loss weight {args.loss_weight} (cap {args.loss_weight_cap:g}): t=0 {weight[0]:.3g}, "
        f"t=500 {weight[500]:.3g}, t=999 {weight[-1]:.3g}")
    log(f"dit: buckets (latent h, w) {sorted(set(buckets))}")
    empty = len(world.CAPTIONS)
    prog = Progress("dit", args.dit_steps, start)
    tr.train()
    no_cond = {"resolution": None, "aspect_ratio": None}
    positions = CanvasPositions(args.pos_jitter, tr)
    fields = WindowedFields(tr)
    for step in range(start + 1, args.dit_steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = _lr(step - 1, args.dit_steps, args.dit_lr, 300)
        x0, cap = bucket_batch(x0_all, families, args.dit_batch, buckets, g, args.field_scale)
        B = x0.shape[0]
        positions.draw(x0.shape[-2:], B, g)
        fields.set(x0.shape[-2:], tr.config.patch_size)
        cap = cap.clone()
        cap[torch.rand(B, generator=g) < 0.1] = empty
        t = torch.randint(0, ab.numel(), (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = as_eps(tr(xt, encoder_hidden_states=embeds[cap], encoder_attention_mask=masks[cap], timestep=t,
                         added_cond_kwargs=no_cond).sample, xt, t, ab, args.prediction)
        loss = (weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), tr.parameters()):
                pe.lerp_(p, 1 - d)
        _record(prog, step, loss, history, args.ckpt_every, args.dit_steps,
                lambda: _checkpoint(path, tr, ema, "ema", opt, g, step, history))
    positions.remove()
    fields.remove()
    return ema.eval(), history


# ------------------------------------------------------------------------------------ lcm distillation

SIGMA_DATA = 0.5  # diffusers' LCMScheduler boundary condition (get_scalings_for_boundary_condition_discrete)


def lcm_scalings(t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCMScheduler at integer timesteps t: the student's output is c_skip·x_t + c_out·x0(ε), so
    at t = 0 it is x_t itself (the consistency boundary condition), exactly as the scheduler applies it."""
    st = t.double() * timestep_scaling
    return (SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)).float(), (st / (st ** 2 + SIGMA_DATA ** 2).sqrt()).float()


def as_eps(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
           prediction: str) -> torch.Tensor:
    """The ε a transformer output means (per batch row t): itself for ε-prediction; for v-prediction
    (v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0) ε = sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x_t, so ε̂ − ε = sqrt(ᾱ)·(v̂ − v) and every loss
    below stays an ε-loss. Why v (measured 2026-12-07, NOTES issue 19): x0 = (x_t − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ)
    multiplies an ε-model's error by up to 160 at t = 999 and 3.4 at t = 500, and a 96-wide model's per-token
    errors came out as 16-px mosaics; a v-model's x0 = sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v̂ does not amplify them."""
    if prediction == "epsilon":
        return out
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * out + (1 - a).sqrt() * x


def consistency(e: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                timestep_scaling: float) -> torch.Tensor:
    """The consistency function f(x_t, t) of a model that predicted ε = e: LCMScheduler.step's `denoised`
    (c_skip·x + c_out·x0 with x0 = (x - sqrt(1 - ᾱ)·e) / sqrt(ᾱ)), per batch row t."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in lcm_scalings(t, timestep_scaling))
    return c_skip * x + c_out * x0


def stage_lcm(args, ckpt: str, teacher, latents: torch.Tensor, families: torch.Tensor, scale: float):
    """Latent consistency distillation (Luo et al. 2023, LCM) of the trained ε-model into a 2-4 step sampler.

    PixArt-δ's LCMScheduler jumps to an x0 prediction at every step; an un-distilled ε-model predicts the mean
    image there (flat colour fields in 4 steps). Distillation: x_{t+k} from data; the frozen teacher takes one DDIM
    step k = 1000 / --lcm-origin-steps back to t (conditional only by default: a guided teacher, --lcm-guidance
    1.5 or 2, lifts prompt fidelity but over-saturates, 1× KID 1.5-2.9 vs 0.3, NOTES issue 19); the
    student's f(x_{t+k}, t+k) is pulled to the target network's f(x̂_t, t) (pseudo-Huber loss), the target an EMA
    of the student (--lcm-ema). f is the scheduler's own c_skip·x + c_out·x0(ε), on its grid t ∈ {k-1, 2k-1, ...,
    999}, so the shipped LCMScheduler samples the student as it was trained. The target network ships."""
    path = os.path.join(ckpt, "lcm.pt")
    sched = models.build_scheduler()
    ab = sched.alphas_cumprod.float()
    k = sched.config.num_train_timesteps // args.lcm_origin_steps
    grid = torch.arange(1, args.lcm_origin_steps + 1) * k - 1  # LCMScheduler's lcm_origin_timesteps
    ts = float(sched.config.timestep_scaling)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(teacher).requires_grad_(False)
    opt, g, start, history = _start("lcm", path, student, target, "target", args.lcm_lr, args.seed + 4,
                                    args.lcm_steps)
    if start >= args.lcm_steps:
        return target.eval(), history
    embeds, masks = caption_embeddings(list(world.CAPTIONS) + [""])
    empty = len(world.CAPTIONS)
    x0_all = latents * scale
    buckets = _buckets(args, latents)
    w_cfg = args.lcm_guidance
    no_cond = {"resolution": None, "aspect_ratio": None}

    def eps(model, x, t, cap):
        return as_eps(model(x, encoder_hidden_states=embeds[cap], encoder_attention_mask=masks[cap], timestep=t,
                            added_cond_kwargs=no_cond).sample, x, t, ab, args.prediction)

    def f(model, x, t, cap):
        return consistency(eps(model, x, t, cap), x, t, ab, ts)

    prog = Progress("lcm", args.lcm_steps, start)
    positions = CanvasPositions(args.pos_jitter, teacher, student, target)  # all three see the same positions
    fields = WindowedFields(teacher, student, target)  # and the same windows
    for step in range(start + 1, args.lcm_steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = _lr(step - 1, args.lcm_steps, args.lcm_lr, 100)
        x0, cap = bucket_batch(x0_all, families, args.dit_batch, buckets, g, args.field_scale)
        positions.draw(x0.shape[-2:], x0.shape[0], g)
        fields.set(x0.shape[-2:], student.config.patch_size)
        t1 = grid[torch.randint(0, grid.numel(), (x0.shape[0],), generator=g)]
        t0 = (t1 - k).clamp_min(0)
        noise = torch.randn(x0.shape, generator=g)
        a1 = ab[t1].view(-1, 1, 1, 1)
        x1 = a1.sqrt() * x0 + (1 - a1).sqrt() * noise
        with torch.no_grad():
            e = eps(teacher, x1, t1, cap)  # one DDIM step of the teacher, t1 -> t0
            if w_cfg != 1.0:  # a guided teacher (LCM's w): the student learns the guided ODE, sampled at scale 0
                e = e + (w_cfg - 1) * (e - eps(teacher, x1, t1, torch.full_like(cap, empty)))
            x0_t = (x1 - (1 - a1).sqrt() * e) / a1.sqrt()
            a0 = ab[t0].view(-1, 1, 1, 1)
            x0_hat = a0.sqrt() * x0_t + (1 - a0).sqrt() * e
            want = f(target, x0_hat, t0, cap)
        pred = f(student, x1, t1, cap)
        c = 1e-3
        loss = (((pred - want) ** 2 + c * c).sqrt() - c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, p in zip(target.parameters(), student.parameters()):
                pt.lerp_(p, 1 - args.lcm_ema)
        _record(prog, step, loss, history, args.ckpt_every, args.lcm_steps,
                lambda: _checkpoint(path, student, target, "target", opt, g, step, history))
    positions.remove()
    fields.remove()
    return target.eval(), history


# --------------------------------------------------------------------------------------------- export


TEACHER = "teacher"  # the model folder's subfolder holding the distillation's teacher (--dit-init reads it first)


def dit_source(folder: str) -> str:
    """The subfolder of a lab model folder that --dit-init continues: the teacher when the folder keeps one."""
    return TEACHER if os.path.exists(os.path.join(folder, TEACHER, "config.json")) else "transformer"


def store_fp16(folder: str, components=("transformer", "vae", TEACHER)) -> None:
    """Rewrite the float weights of a model folder's components in fp16 (half the bytes; the lab's loaders upcast
    to fp32). A component the folder lacks is skipped."""
    from safetensors.torch import load_file, save_file

    for sub in components:
        f = os.path.join(folder, sub, "diffusion_pytorch_model.safetensors")
        if os.path.exists(f):
            sd = load_file(f)
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, f)


def export(args, out: str, vae, transformer, scale: float, meta: dict, teacher=None) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tok = tiny_tokenizer()
        te = tiny_text_encoder(len(tok))
    vae.register_to_config(scaling_factor=scale)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae,
                               transformer=models.with_sigma_channels(transformer),
                               scheduler=models.build_scheduler(args.prediction))
    folder = os.path.join(out, "model")
    save_pretrained_offline(pipe, folder, safe_serialization=True)
    if teacher is not None:
        models.with_sigma_channels(teacher).save_pretrained(os.path.join(folder, TEACHER), safe_serialization=True)
    store_fp16(folder)
    fp16 = "transformer, teacher and vae" if teacher is not None else "transformer and vae"
    meta = {**meta, "storage": f"{fp16} weights stored fp16 (lab/models.py upcasts them to fp32 on load); text "
            "encoder fp32"}
    with open(os.path.join(folder, "lab_training.json"), "w") as f:
        json.dump(meta, f, indent=2)
    size = sum(os.path.getsize(os.path.join(r, fn)) for r, _, fs in os.walk(folder) for fn in fs)
    log(f"wrote {folder} ({size / 2**20:.2f} MiB)")
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tiled_diffusion.lab.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (checkpoints, cache, and the model in OUT/model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2048, help="training images rendered from the world")
    p.add_argument("--data-size", type=int, default=BUCKETS_PX,
                   help="side of the rendered training images (px; default: the largest bucket's, so every bucket "
                        "fits); larger than a bucket, crops are drawn")
    p.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=True,
                   help="multi-aspect (and multi-size) latent crops, lab/models.BUCKETS, that fit --data-size")
    p.add_argument("--pos-jitter", type=float, default=1.0,
                   help="train half the steps at canvas position densities up to this side ratio (CanvasPositions; "
                        "1: off)")
    p.add_argument("--field-scale", type=int, default=1,
                   help="half the batches are fields this many times a bucket's side (1/F² the rows), attended by "
                        "token-centred windows of the training field as the canvas forward does (WindowedFields); "
                        "--data-size must hold them")
    p.add_argument("--arch", default="", help="JSON overrides of lab/models.TRANSFORMER_CONFIG to train")
    p.add_argument("--dit-init", default="", help="a trained lab model folder whose DiT this run's starts from: its "
                   "teacher/ (the EMA model its LCM stage distilled) when it keeps one, else its transformer; deepened "
                   "to --arch's num_layers (a multiple of its depth) by identity blocks and re-cut to a patch_size "
                   "dividing its own (grown_from); its other --arch keys must match the folder's. Folders without a "
                   "teacher (up to v1.7) hold only the LCM-distilled network: a continuation re-learns the teacher "
                   "first (benchmarks/NOTES.md: 3500 + 500 steps improved v1.6, 1200-2000 + 300 did not)")
    p.add_argument("--vae-from", default="", help="a model folder whose trained VAE is reused (skips stage 2)")
    p.add_argument("--vae-init", default="", help="a model folder whose trained VAE this run's stage 2 continues")
    p.add_argument("--vae-arch", default="", help="JSON overrides of lab/models.VAE_CONFIG to train "
                   f"(keys {', '.join(models.VAE_ARCH_KEYS)}; latent_channels stays 4, PixArt's; three "
                   "block_out_channels make an f4 VAE: give the DiT --arch '{\"patch_size\": 4}' to keep its tokens 16 px)")
    p.add_argument("--vae-crop", type=int, default=CROP, help="side of the VAE's random training crops (px)")
    p.add_argument("--vae-noise", type=float, default=1.0,
                   help="scale of the posterior sample's noise while training the VAE (1: z ~ q(z|x); 0: the posterior "
                   "mean, which is what the DiT is trained on and what it must decode)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--prediction", choices=models.PREDICTIONS, default="epsilon",
                   help="what the transformer outputs (PixArt's ε, or v: see as_eps); the exported scheduler says it")
    p.add_argument("--dit-steps", type=int, default=10000)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=8e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--loss-weight", choices=LOSS_WEIGHTS, default="eps",
                   help="the DiT's ε-loss weighted per t as this parametrisation's loss (see loss_weights)")
    p.add_argument("--loss-weight-cap", type=float, default=100.0, help="upper bound of the x0 / v weight")
    p.add_argument("--lcm-steps", type=int, default=2000, help="LCM distillation steps (0: ship the ε-model)")
    p.add_argument("--lcm-lr", type=float, default=2e-4)
    p.add_argument("--lcm-guidance", type=float, default=1.0,
                   help="classifier-free guidance of the distillation teacher (1: conditional only)")
    p.add_argument("--lcm-ema", type=float, default=0.95, help="the target network's EMA decay (LCM's 0.95)")
    p.add_argument("--lcm-origin-steps", type=int, default=50, help="the distillation grid (LCMScheduler's "
                   "original_inference_steps): the teacher's DDIM step is 1000 / this")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared 2-core machine (idle threads spin-wait)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images and steps (checks the command)")
    args = p.parse_args(argv)
    if args.vae_arch and set(json.loads(args.vae_arch)) - set(models.VAE_ARCH_KEYS):
        p.error(f"--vae-arch: only {', '.join(models.VAE_ARCH_KEYS)} may change, got {args.vae_arch}")
    if args.dit_init and not os.path.exists(os.path.join(args.dit_init, "transformer", "config.json")):
        p.error(f"--dit-init: no trained lab model in {args.dit_init!r} (a folder lab.train wrote in OUT/model)")
    grows = {"num_layers", "patch_size"}  # what --dit-init may change (grown_from); the rest is the folder's
    if args.dit_init and args.arch:  # refused here, before the data and VAE stages run, not at the DiT stage
        src = models._arch(args.dit_init, dit_source(args.dit_init), models.ARCH_KEYS)
        arch = json.loads(args.arch)
        clash = {k: v for k, v in arch.items() if k not in grows and src.get(k) != v}
        if clash:
            p.error(f"--dit-init: the transformer's config is {args.dit_init}'s; --arch differs in {clash}")
        q = arch.get("patch_size", src["patch_size"])
        if not isinstance(q, int) or q < 1 or src["patch_size"] % q:
            p.error(f"--dit-init: --arch patch_size {arch['patch_size']} must be a positive divisor of "
                    f"{args.dit_init}'s {src['patch_size']} (finer tokens only)")
        n = arch.get("num_layers", src["num_layers"])
        if not isinstance(n, int) or n < 1 or n % src["num_layers"]:
            p.error(f"--dit-init: --arch num_layers {n} must be a positive multiple of {args.dit_init}'s "
                    f"{src['num_layers']} layers (identity blocks between them)")
    if args.field_scale < 1:
        p.error(f"--field-scale: a whole side ratio >= 1 (1: off), got {args.field_scale}")
    if not args.pos_jitter >= 1:
        p.error(f"--pos-jitter: a canvas side ratio >= 1 (1: off), got {args.pos_jitter}")
    if args.quick:
        args.images, args.vae_steps, args.dit_steps, args.lcm_steps, args.ckpt_every = 64, 20, 20, 10, 10
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache, ckpt = os.path.join(args.out, "cache"), os.path.join(args.out, "ckpt")
    os.makedirs(cache, exist_ok=True)
    os.makedirs(ckpt, exist_ok=True)
    t_all = time.perf_counter()
    times = {}
    t0 = time.perf_counter()
    images, families = stage_data(args, cache)
    times["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vae, vae_hist = stage_vae(args, ckpt, images)
    times["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents, scale, psnr = stage_latents(cache, vae, images)
    times["latents_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr, dit_hist = stage_dit(args, ckpt, latents, families, scale)
    times["dit_s"] = time.perf_counter() - t0
    lcm_hist, teacher = [], None
    if args.lcm_steps > 0:
        t0 = time.perf_counter()
        teacher = copy.deepcopy(tr)  # shipped beside the student; a copy, clear of what stage_lcm installs on tr
        tr, lcm_hist = stage_lcm(args, ckpt, tr, latents, families, scale)
        times["lcm_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all  # this invocation only (a resumed run counts from its start)
    meta = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "train_size": models.TRAIN_SIZE,
            "dit_buckets": sorted(set(_buckets(args, latents, warn=False))),
            "captions": world.FAMILIES, "vae_psnr_db": psnr, "scaling_factor": scale, "times": times,
            "vae_loss": vae_hist, "dit_loss": dit_hist, "lcm_loss": lcm_hist, "threads": torch.get_num_threads()}
    export(args, args.out, vae, tr, scale, meta, teacher)
    log(f"done in {times['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
