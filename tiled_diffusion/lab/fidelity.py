"""Prompt fidelity: does a sample show the scene family its caption asked for?

A small CNN (`FamilyClassifier`, ~25k parameters) is trained on ground-truth renders of the world's four families
(`train_classifier`: square crops of 32–128 px at fresh world seeds, blurred and noised at random so that soft,
VAE-decoded samples are in its training distribution) and shipped beside the lab model
(`classifier.safetensors`, fp16; `load_classifier` upcasts). Retrain with
`python -m tiled_diffusion.lab.fidelity --out FILE` (deterministic for a fixed thread count, ~3 min at 1 thread).

`fidelity(images, families)` is the share of images whose predicted family is the prompted one. An image larger
than the training size is cut into non-overlapping TRAIN_SIZE² patches and classified by the mean of the patches'
log-probabilities (a canvas "is" the family its patches mostly are); `patch_fidelity` is the share of patches.

Layouts: images [B, 3, H, W] in [-1, 1]; families: indices into world.FAMILIES.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import models, world

CLASSIFIER_PATH = os.path.join(os.path.dirname(__file__), "classifier.safetensors")
CLS_SEED0 = 2_000_000  # world seeds of the classifier's training crops: away from the trainer's and quality's
CROPS = (32, 48, 64, 96, 128)


class FamilyClassifier(nn.Module):
    """Four stride-2 conv blocks (16/32/48/64 channels), global mean and std pooling, a linear head: any input
    size ≥ 16 px; mean and std pooling give it colour and texture statistics of the whole crop."""

    def __init__(self, n_classes: int = len(world.FAMILIES)):
        super().__init__()
        chans, layers, c_in = (16, 32, 48, 64), [], 3
        for c in chans:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1))


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random softening as generated images have it: a down/up resampling by 1–4×, Gaussian noise, a small gain."""
    B, _, H, W = x.shape
    f = float(1 + 3 * torch.rand((), generator=g))
    if f > 1.2:
        small = F.interpolate(x, size=(max(4, int(H / f)), max(4, int(W / f))), mode="area")
        x = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    x = x * (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) - 0.5))
    x = x + 0.05 * torch.rand((), generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def render_crops(n: int, size: int, seed0: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n ground-truth crops [n, 3, size, size] (families in turn, world seeds seed0 + i, random offsets), labels."""
    fams = torch.arange(n) % len(world.FAMILIES)
    imgs = torch.stack([world.random_crop(int(fams[i]), seed=seed0 + i, size=size, generator=g) for i in range(n)])
    return imgs, fams


def train_classifier(steps: int = 600, batch: int = 32, per_size: int = 384, seed: int = 0, log=print):
    """The classifier, trained on ground-truth crops of every size in CROPS (per_size of each, rendered once)."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    data = [render_crops(per_size, s, CLS_SEED0 + 10_000 * k, g) for k, s in enumerate(CROPS)]
    log(f"classifier: rendered {per_size * len(CROPS)} crops in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(seed)
    net = FamilyClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = 3e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        imgs, labels = data[step % len(data)]
        idx = torch.randint(0, imgs.shape[0], (batch,), generator=g)
        x = imgs[idx]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = _degrade(x, g)
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"classifier {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return net.eval()


def save_classifier(net: FamilyClassifier, path: str = CLASSIFIER_PATH) -> None:
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, path)


def load_classifier(path: str = CLASSIFIER_PATH) -> FamilyClassifier:
    net = FamilyClassifier()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return net.eval()


def _patches(img: torch.Tensor, patch: int) -> torch.Tensor:
    """[n, 3, p, p] non-overlapping patches of one image [3, H, W] (the whole image when smaller than 2 patches)."""
    _, H, W = img.shape
    if H < 2 * patch and W < 2 * patch:
        return img[None]
    ph, pw = min(patch, H), min(patch, W)
    crops = img[:, : H // ph * ph, : W // pw * pw].unfold(1, ph, ph).unfold(2, pw, pw)
    return crops.permute(1, 2, 0, 3, 4).reshape(-1, 3, ph, pw)


@torch.no_grad()
def classify(images: torch.Tensor, net: FamilyClassifier | None = None, patch: int = models.TRAIN_SIZE):
    """(image predictions [B], per-image patch predictions list of [n_i]) for images [B, 3, H, W] in [-1, 1]."""
    net = net or load_classifier()
    preds, patch_preds = [], []
    for img in images.float().clamp(-1, 1):
        logp = F.log_softmax(net(_patches(img, patch)), dim=1)
        preds.append(int(logp.mean(0).argmax()))
        patch_preds.append(logp.argmax(1))
    return torch.tensor(preds), patch_preds


def fidelity(images: torch.Tensor, families, net: FamilyClassifier | None = None) -> float:
    """Share of images classified as their prompted family (families: indices, names or captions)."""
    want = torch.tensor([list(world.FAMILIES).index(world.family_of(f)) for f in families])
    preds, _ = classify(images, net)
    return float((preds == want).float().mean())


def fidelity_by_family(images: torch.Tensor, families, net: FamilyClassifier | None = None) -> dict:
    """{family name: share of that family's images classified as it}, plus "patches": share of all patches."""
    names = [world.family_of(f) for f in families]
    want = torch.tensor([list(world.FAMILIES).index(n) for n in names])
    preds, patch_preds = classify(images, net)
    out = {}
    for k, name in enumerate(world.FAMILIES):
        sel = want == k
        if sel.any():
            out[name] = float((preds[sel] == k).float().mean())
    out["patches"] = float(torch.cat([(p == w).float() for p, w in zip(patch_preds, want)]).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiled_diffusion.lab.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=CLASSIFIER_PATH)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = train_classifier(steps=args.steps)
    save_classifier(net, args.out)
    g = torch.Generator().manual_seed(99)
    for size in (32, 64, 128, 256):
        x, y = render_crops(64, size, CLS_SEED0 + 900_000 + size, g)
        print(f"held-out ground truth {size}²: accuracy {fidelity(x, y.tolist(), load_classifier(args.out)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
