"""One GPU, real architectures with random weights: masks, training and predict throughput.

    python bench/gpu_check.py            # on a CUDA machine (bench/gpu_check.sh sets it up)
    python bench/gpu_check.py --smoke    # CPU, tiny models, a few steps: checks the code only

Prints one JSON object: SAM masks images/s at pps 16 for vit_b and vit_h (ours vs stock
``SamAutomaticMaskGenerator``, with the masks compared as in bench/masks.py), SAM 2.1 tiny and
large through the sam2 package's ``SAM2AutomaticMaskGenerator`` (images/s, masks per image;
skipped if sam2 is not installed), one training
step's images/s of convnext_base_w at 256x256 in fp32 and in AMP (``runtime.precision: auto``),
``opensam predict`` images/s (superpixel masks and per pixel), and the peak GPU memory of each
part. Without CUDA (and without --smoke) it prints ``{"skipped": "..."}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from masks import demo_images, match_masks, run_ours, run_stock  # noqa: E402

from opensam.apps.predict import Photo, predict_photos  # noqa: E402
from opensam.config import ClipParams  # noqa: E402
from opensam.demo.scene import render_scene  # noqa: E402
from opensam.masks.sam import SAM_BUILDERS, AmgOptions, tie_upscaling_kernels  # noqa: E402
from opensam.masks.superpixels import SuperpixelGenerator  # noqa: E402
from opensam.model.segmenter import build_model  # noqa: E402
from opensam.parallel.context import Runtime, resolve_precision, set_runtime  # noqa: E402
from opensam.train.engine import TrainConfig, build_run, train_step  # noqa: E402
from opensam.train.supervised import Supervised  # noqa: E402

PROMPTS = ["a lizard", "a human hand", "a color board", "a background"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return (
        round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    )


def sam_masks(name: str, images: list[np.ndarray], device: torch.device, pps: int) -> dict:
    """Ours vs stock on the same random SAM: images/s, mask counts and the worst matched IoU."""
    torch.manual_seed(0)
    sam = tie_upscaling_kernels(SAM_BUILDERS[name]().eval()).to(device)
    opts = AmgOptions(pps, 64, 0.0, 0.0, 0.9, 0)
    run_stock(sam, opts, images[0])  # warm-up: kernels, cudnn autotuning
    run_ours(sam, opts, images[0])
    peak_reset()
    stock_s = ours_s = 0.0
    worst, same = 1.0, True
    for image in images:
        sync()
        s_masks, _, _, s_total = run_stock(sam, opts, image)
        sync()
        o_masks, _, o_total = run_ours(sam, opts, image)
        sync()
        n_s, n_o, iou = match_masks(s_masks, o_masks)
        same, worst = same and n_s == n_o and iou >= 0.99, min(worst, iou)
        stock_s, ours_s = stock_s + s_total, ours_s + o_total
    del sam
    return {
        "stock_images_per_s": round(len(images) / stock_s, 3),
        "ours_images_per_s": round(len(images) / ours_s, 3),
        "speedup": round(stock_s / ours_s, 2),
        "same_masks": same,
        "worst_iou": round(worst, 4),
        "peak_gib": peak_gib(),
    }


def sam2_masks(model: str, images: list[np.ndarray], device: torch.device, pps: int) -> dict:
    """SAM 2.1 ``model`` (random weights) through the sam2 package: images/s, masks per image."""
    from opensam.masks.sam2_masks import Sam2MaskGenerator, Sam2Options, build_sam2_model

    torch.manual_seed(0)
    net = build_sam2_model(model, str(device))
    gen = Sam2MaskGenerator(net, Sam2Options(pps, 64, 0.0, 0.0, 0.9, 0))
    gen.generate(images[0])  # warm-up
    peak_reset()
    sync()
    start, counts = time.perf_counter(), []
    for image in images:
        counts.append(len(gen.generate(image)))
    sync()
    seconds = time.perf_counter() - start
    del gen, net
    return {
        "images_per_s": round(len(images) / seconds, 3),
        "masks_per_image": round(float(np.mean(counts)), 1),
        "peak_gib": peak_gib(),
    }


def train_steps(
    clip: str, device: torch.device, precision: str, batch: int, steps: int, size: int
) -> dict:
    """Images/s of the training loop's own step (forward with masks, fp32 loss, backward)."""
    set_runtime(Runtime(device, precision))
    torch.manual_seed(0)
    model = build_model(ClipParams(model=clip, pretrained=None), PROMPTS).to(device).train()
    h, w = model.grid_hw(size)
    cfg = TrainConfig(epochs=1, lr_max=1e-4, lr_min=1e-6, weight_decay=1e-8, batch_size=batch)
    run = build_run(model, Supervised(cfg, pseudo=False), cfg, steps + 2)
    gen = torch.Generator().manual_seed(0)
    m = 64  # masks per image, disjoint stripes (the winner map) with their pooling weights
    winner = (torch.arange(size * size).reshape(size, size) * m // (size * size)).long()
    pool = torch.rand(batch, m, h, w, generator=gen)
    data = {
        "image": torch.rand(batch, 3, size, size, generator=gen),
        "label": torch.randint(0, 4, (batch, size, size), generator=gen),
        "pool_weights": pool / pool.sum((2, 3), keepdim=True),
        "winner": winner.expand(batch, size, size).contiguous(),
    }
    batch_dev = {k: v.to(device) for k, v in data.items()}
    for _ in range(2):  # warm-up (cudnn.benchmark autotuning)
        train_step(run, batch_dev, None, 0)
    sync()
    peak_reset()
    start = time.perf_counter()
    for step in range(steps):
        train_step(run, batch_dev, None, step)
    sync()
    seconds = time.perf_counter() - start
    return {
        "precision": precision,
        "images_per_s": round(batch * steps / seconds, 2),
        "batch": batch,
        "peak_gib": peak_gib(),
    }


def predict_rate(clip: str, device: torch.device, precision: str, n: int, size: int) -> dict:
    """``predict_photos`` images/s on n demo JPEGs (1024x683): superpixels and per pixel."""
    set_runtime(Runtime(device, precision))
    torch.manual_seed(0)
    model = build_model(ClipParams(model=clip, pretrained=None), PROMPTS)
    colors = np.array([[250, 220, 40], [40, 200, 60], [40, 90, 230], [150, 60, 190]], np.uint8)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = []
        for i in range(n):
            path = Path(tmp) / "in" / f"p{i}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(render_scene(np.random.default_rng(i), 1024, 683)[0]).save(path)
            photos.append(Photo(f"p{i}", path))
        for label, masks in (("superpixels", SuperpixelGenerator(16, 10.0, 0)), ("none", None)):
            peak_reset()
            res = predict_photos(
                model,
                photos,
                Path(tmp) / label,
                ["a", "b", "c", "d"],
                colors,
                size,
                masks,
                batch_size=8,
            )
            out[label] = {"images_per_s": round(res.images_per_s, 2), "peak_gib": peak_gib()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: code check")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            json.dumps(
                {"skipped": f"no CUDA GPU visible to torch {torch.__version__}: nothing measured"}
            )
        )
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    amp = resolve_precision("auto", device)
    smoke = args.smoke
    clip, sams = ("opensam-tiny", ["tiny"]) if smoke else ("convnext_base_w", ["vit_b", "vit_h"])
    n_img, steps, batch = (1, 2, 2) if smoke else (8, 20, 16)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "amp_precision": amp,
    }
    images = demo_images(n_img)
    report["sam_masks_pps16"] = {name: sam_masks(name, images, device, 16) for name in sams}
    try:
        import sam2  # noqa: F401  (requirements.txt)
    except ImportError:
        report["sam2_masks_pps16"] = {"skipped": "sam2 is not installed"}
    else:
        sam2s = ["sam2.1_hiera_tiny"] if smoke else ["sam2.1_hiera_tiny", "sam2.1_hiera_large"]
        report["sam2_masks_pps16"] = {
            name: sam2_masks(name, images, device, 4 if smoke else 16) for name in sam2s
        }
    report["train_step_256"] = {
        "fp32": train_steps(clip, device, "fp32", batch, steps, 256),
        "amp": train_steps(clip, device, amp, batch, steps, 256),
    }
    report["predict"] = predict_rate(clip, device, amp, 4 if smoke else 48, 256)
    report["peak_gib"] = (
        peak_gib() if not cuda else round(torch.cuda.max_memory_reserved() / 2**30, 2)
    )
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
