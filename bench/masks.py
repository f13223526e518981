"""Stock ``SamAutomaticMaskGenerator`` vs opensam's ``SamMaskGenerator``, side by side.

    python bench/masks.py            # tiny + vit_b (random weights), 2 demo images, pps 16: ~5 min
    python bench/masks.py --quick    # tiny only, 1 image: < 1 min

Both run the same randomly initialised SAM (upscaling kernels tied so that masks are blobs, as
with real weights, not checkerboards) on the same 256x256 demo-like images. Random weights
predict IoUs around 0 and logits below the stability offset, so both filters are off
(thresholds 0) and the kept masks are those surviving box NMS. The ablation rows add our changes
one at a time on the first image (they reuse the encoder features of the full runs, so their
encoder column repeats the full run's). Last line: ``masks speedup: N.NNx`` = stock time / our
time, vit_b (tiny with --quick).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from opensam.demo import render_scene
from opensam.images import resize_image
from opensam.sam_masks import SAM_BUILDERS, AmgOptions, SamMaskGenerator, tie_upscaling_kernels


def demo_images(n: int, size: int = 256) -> list[np.ndarray]:
    """n demo photos (1024x683, as the thesis's) resized to size x size, uint8 RGB."""
    return [
        resize_image(render_scene(np.random.default_rng(i), 1024, 683)[0], size) for i in range(n)
    ]


def timed(obj: Any, name: str, log: list[float]) -> None:
    """Wrap method ``name`` of ``obj`` so each call appends its seconds to ``log``."""
    fn = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, wrapper)


def match_masks(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Counts of two (n, H, W) bool stacks and the worst best-match IoU (both directions)."""
    if len(a) == 0 or len(b) == 0:
        return len(a), len(b), float(len(a) == len(b))
    fa, fb = (torch.as_tensor(m.reshape(len(m), -1), dtype=torch.float32) for m in (a, b))
    inter = fa @ fb.T
    iou = inter / (fa.sum(1)[:, None] + fb.sum(1)[None] - inter)
    return len(a), len(b), float(min(iou.max(1).values.min(), iou.max(0).values.min()))


def run_stock(
    sam: torch.nn.Module, opts: AmgOptions, image: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """Stock generate: non-empty masks (n, H, W) bool, encoder seconds, total seconds."""
    gen = SamAutomaticMaskGenerator(sam, opts.points_per_side, opts.points_per_batch, 0.0, 0.0,
                                    box_nms_thresh=opts.box_nms_thresh,
                                    min_mask_region_area=opts.min_mask_region_area)  # fmt: skip
    enc: list[float] = []
    timed(gen.predictor, "set_image", enc)
    t0 = time.perf_counter()
    records = gen.generate(image)
    total = time.perf_counter() - t0
    masks = np.array([r["segmentation"] for r in records if r["area"] > 0], bool)
    return masks.reshape(-1, *image.shape[:2]), enc[0], total


def run_ours(sam: torch.nn.Module, opts: AmgOptions, image: np.ndarray,
             features: torch.Tensor | None = None) -> tuple[np.ndarray, float, float]:  # fmt: skip
    """Our generate (with given encoder ``features``: the encoder is skipped, 0 s)."""
    gen = SamMaskGenerator(sam, opts)
    enc: list[float] = []
    if features is not None:
        gen._embed = lambda _image: features  # type: ignore[method-assign]
    timed(gen, "_embed", enc)
    t0 = time.perf_counter()
    ms = gen.generate(image)
    return ms.masks, enc[0] if features is None else 0.0, time.perf_counter() - t0


def features_of(sam: torch.nn.Module, opts: AmgOptions, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return SamMaskGenerator(sam, opts)._embed(image)


def bench_model(name: str, images: list[np.ndarray], args: argparse.Namespace,
                row: Callable[..., None]) -> tuple[float, float]:  # fmt: skip
    """Print this model's rows; return (stock seconds, our seconds) over all images."""
    torch.manual_seed(0)
    sam = tie_upscaling_kernels(SAM_BUILDERS[name]().eval())
    opts = AmgOptions(args.pps, args.batch, 0.0, 0.0, args.nms, args.mra)
    stock_s = ours_s = 0.0
    for i, image in enumerate(images):
        s_masks, s_enc, s_total = run_stock(sam, opts, image)
        o_masks, o_enc, o_total = run_ours(sam, opts, image)
        n_s, n_o, worst = match_masks(s_masks, o_masks)
        same = "yes" if n_s == n_o and worst >= 0.99 else "NO"
        row(name, f"image {i}: stock SamAutomaticMaskGenerator", s_enc, s_total, n_s, "")
        row(name, f"image {i}: ours", o_enc, o_total, n_o, f"same masks: {same} (IoU>={worst:.4f})")
        stock_s, ours_s = stock_s + s_total, ours_s + o_total
        if i == 0 and not args.no_ablation:
            ablate(name, sam, opts, image, (s_enc, o_enc), row)
    ips = f"{len(images) / stock_s:.3f} vs {len(images) / ours_s:.3f} images/s"
    print(
        f"{name}: stock {stock_s:.2f} s, ours {ours_s:.2f} s ({ips}), ratio {stock_s / ours_s:.2f}x"
    )
    return stock_s, ours_s


def ablate(name: str, sam: torch.nn.Module, opts: AmgOptions, image: np.ndarray,
           enc_s: tuple[float, float], row: Callable[..., None]) -> None:  # fmt: skip
    """Our generator with the changes added one at a time (prompt part timed, encoder reused)."""
    stock_feats = features_of(sam, AmgOptions(fast_encoder=False), image)
    steps = [
        ("+ post at output size from low-res logits, no RLE", dict(fast_decoder=False), 0),
        ("+ folded decoder (shared layer 0, channels-last upscaling)", {}, 0),
        ("+ fused encoder attention (= ours)", {}, 1),
        ("  ours with points_per_batch 256", dict(points_per_batch=256), 1),
        ("  ours with points_per_batch 16", dict(points_per_batch=16), 1),
    ]
    for label, change, enc_kind in steps:
        variant = AmgOptions(**{**opts.__dict__, "fast_encoder": enc_kind == 1, **change})
        _, _, prompts = run_ours(sam, variant, image, stock_feats)
        row(name, f"  ablation {label}", enc_s[enc_kind], enc_s[enc_kind] + prompts, None, "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 image (< 1 min)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--pps", type=int, default=16, help="points_per_side")
    parser.add_argument("--batch", type=int, default=64, help="points_per_batch")
    parser.add_argument("--nms", type=float, default=0.7, help="box_nms_thresh")
    parser.add_argument("--mra", type=int, default=0, help="min_mask_region_area")
    parser.add_argument("--no-ablation", action="store_true")
    args = parser.parse_args()
    models, n_images = (["tiny"], 1) if args.quick else (["tiny", "vit_b"], args.images)
    images = demo_images(n_images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, pps {args.pps}, "
          f"batch {args.batch}, box_nms {args.nms}, min_region_area {args.mra}, "
          f"{n_images} image(s) 256x256")  # fmt: skip
    print(f"{'model':6} {'pipeline':62} {'encoder s':>9} {'total s':>8} {'masks':>5}  check")

    def row(model: str, label: str, enc: float, total: float, n: int | None, note: str) -> None:
        print(f"{model:6} {label:62} {enc:9.2f} {total:8.2f} {'' if n is None else n:>5}  {note}")

    result = (1.0, 1.0)
    for name in models:
        result = bench_model(name, images, args, row)
    print(f"masks speedup: {result[0] / result[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
