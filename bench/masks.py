"""Stock ``SamAutomaticMaskGenerator`` vs opensam's ``SamMaskGenerator``, and SAM 2.1, side by side.

    python bench/masks.py            # tiny, vit_b, SAM 2.1 tiny (random weights), 2 images: 12 min
    python bench/masks.py --quick    # tiny only, 1 image: < 1 min
    torchrun --standalone --nproc_per_node 2 bench/masks.py --no-ablation   # images split by rank

Both run the same randomly initialised SAM (upscaling kernels tied so that masks are blobs, as
with real weights, not checkerboards) on the same 256x256 demo photos. Random weights predict
IoUs around 0 and logits below the stability offset, so both filters are off (thresholds 0):
the kept masks are the non-empty ones surviving box NMS (at 0.9 by default), compared by count
and matched IoU. With no filter, stock RLE-encodes every mask, more than with real weights and
thresholds, so its RLE seconds are shown and a ratio without them too.
Each pipeline is warmed up once (pps <= 8) before timing. Then, on the first image: the
changes added one at a time, and one batch of prompts taken apart step by step. Last line:
``masks speedup: N.NNx`` = stock seconds / our seconds, summed over the images, vit_b (tiny
with --quick).

``--sam2 sam2.1_hiera_tiny`` (the default; ``none`` skips it) also runs the sam2 package's
``SAM2AutomaticMaskGenerator`` (random weights, thresholds 0, the same pps, points_per_batch,
box NMS and min area) on the same images, and a summary line gives the images/s of stock SAM 1,
our SAM 1 path and SAM 2.1 side by side (SAM 1: the last model run, vit_b or tiny). SAM 2.1's
masks differ from SAM 1's (another model), so only its count is shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything import automatic_mask_generator as stock_amg
from segment_anything.modeling import Sam
from segment_anything.utils import amg

import opensam.masks.sam as sam_module
from opensam.demo.dataset import render_scene
from opensam.images import resize_image
from opensam.masks.sam import (
    SAM_BUILDERS,
    AmgOptions,
    ImageSide,
    SamMaskGenerator,
    decode_masks,
    tie_upscaling_kernels,
)

Row = Callable[[str, float, float, Any, str], None]


def demo_images(n: int, size: int = 256) -> list[np.ndarray]:
    """n demo photos (1024x683, as the thesis's) resized to size x size, uint8 RGB."""
    return [
        resize_image(render_scene(np.random.default_rng(i), 1024, 683)[0], size) for i in range(n)
    ]


def seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed(obj: Any, name: str, log: list[float]) -> None:
    """Wrap method ``name`` of ``obj`` so each call appends its seconds to ``log``."""
    fn = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out, s = seconds(lambda: fn(*args, **kwargs))
        log.append(s)
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
    sam: Sam, opts: AmgOptions, image: np.ndarray
) -> tuple[np.ndarray, float, float, float]:
    """Stock generate: non-empty masks (n, H, W) bool, encoder, RLE and total seconds."""
    gen = SamAutomaticMaskGenerator(
        sam,
        opts.points_per_side,
        opts.points_per_batch,
        0.0,
        0.0,
        box_nms_thresh=opts.box_nms_thresh,
        min_mask_region_area=opts.min_mask_region_area,
    )
    enc: list[float] = []
    rle: list[float] = []
    timed(gen.predictor, "set_image", enc)
    saved = {name: getattr(stock_amg, name) for name in ("mask_to_rle_pytorch", "rle_to_mask")}
    for name in saved:
        timed(stock_amg, name, rle)
    try:
        records, total = seconds(lambda: gen.generate(image))
    finally:
        for name, fn in saved.items():
            setattr(stock_amg, name, fn)
    masks = np.array([r["segmentation"] for r in records if r["area"] > 0], bool)
    return masks.reshape(-1, *image.shape[:2]), enc[0], sum(rle), total


def run_ours(
    sam: Sam, opts: AmgOptions, image: np.ndarray, features: torch.Tensor | None = None
) -> tuple[np.ndarray, float, float]:
    """Our generate; given encoder ``features``, the encoder is skipped (0 s)."""
    gen = SamMaskGenerator(sam, opts)
    if features is not None:
        gen._embed = lambda image: features  # type: ignore[method-assign]
    enc: list[float] = []
    timed(gen, "_embed", enc)
    ms, total = seconds(lambda: gen.generate(image))
    return ms.masks, enc[0] if features is None else 0.0, total


def bench_model(
    name: str, images: list[np.ndarray], args: argparse.Namespace, row: Row
) -> tuple[float, float]:
    """Print this model's rows; return (stock seconds, our seconds) over all images."""
    torch.manual_seed(0)
    sam = tie_upscaling_kernels(SAM_BUILDERS[name]().eval())
    opts = AmgOptions(args.pps, args.batch, 0.0, 0.0, args.nms, args.mra)
    warm = dataclasses.replace(opts, points_per_side=min(args.pps, 8))
    run_stock(sam, warm, images[0])  # first calls allocate and build kernels: not timed
    run_ours(sam, warm, images[0])
    stock_s = ours_s = rle_s = 0.0
    for i, image in enumerate(images):
        s_masks, s_enc, s_rle, s_total = run_stock(sam, opts, image)
        o_masks, o_enc, o_total = run_ours(sam, opts, image)
        n_s, n_o, worst = match_masks(s_masks, o_masks)
        same = "yes" if n_s == n_o and worst >= 0.99 else "NO"
        row(
            f"image {i}: stock SamAutomaticMaskGenerator", s_enc, s_total, n_s, f"RLE {s_rle:.2f} s"
        )
        row(f"image {i}: ours", o_enc, o_total, n_o, f"same masks: {same}, IoU >= {worst:.4f}")
        stock_s, ours_s, rle_s = stock_s + s_total, ours_s + o_total, rle_s + s_rle
        if i == 0:
            first = (s_enc, s_total, o_enc, o_total)
    ips = f"{len(images) / stock_s:.3f} vs {len(images) / ours_s:.3f} images/s"
    print(
        f"{name}: stock {stock_s:.2f} s, ours {ours_s:.2f} s ({ips}), {stock_s / ours_s:.2f}x; "
        f"without stock's RLE time {(stock_s - rle_s) / ours_s:.2f}x"
    )
    if not args.no_ablation:
        ablate(sam, opts, images[0], first, row, batches=not args.quick)
        take_apart(sam, opts, images[0])
    return stock_s, ours_s


def bench_sam2(model: str, images: list[np.ndarray], args: argparse.Namespace, row: Row) -> float:
    """SAM 2.1 ``model`` (random weights) through the sam2 package's automatic generator on
    ``images``: print one row per image; return its seconds over all images."""
    from opensam.masks.sam2_masks import Sam2MaskGenerator, Sam2Options, build_sam2_model

    torch.manual_seed(0)
    net = build_sam2_model(model, "cpu")
    opts = Sam2Options(args.pps, args.batch, 0.0, 0.0, args.nms, args.mra)
    warm = dataclasses.replace(opts, points_per_side=min(args.pps, 8))
    Sam2MaskGenerator(net, warm).generate(images[0])  # first calls: not timed
    gen, total = Sam2MaskGenerator(net, opts), 0.0
    enc: list[float] = []
    timed(gen.amg.predictor, "set_image", enc)
    for i, image in enumerate(images):
        ms, s = seconds(lambda image=image: gen.generate(image))
        row(f"image {i}: SAM2AutomaticMaskGenerator ({model})", enc[-1], s, len(ms), "")
        total += s
    print(f"{model}: {total:.2f} s ({len(images) / total:.3f} images/s)")
    return total


def ablate(
    sam: Sam, opts: AmgOptions, image: np.ndarray, first: tuple[float, ...], row: Row, batches: bool
) -> None:
    """Our generator with the changes added one at a time, image 0 (the prompt part is re-run
    on cached features; the encoder column is copied from the full runs)."""
    s_enc, s_total, o_enc, o_total = first
    features = SamMaskGenerator(sam, AmgOptions(fast_encoder=False))._embed(image)
    print("ablation, image 0 (cumulative)")
    row("  stock", s_enc, s_total, None, "")
    decode = sam_module.PROMPTS_PER_DECODE
    steps: list[tuple[str, dict[str, Any]]] = [
        ("  + post at output size from low-res logits, bool masks", {"fast_decoder": False}),
        (
            f"  + folded decoder, channels-last, {sam_module.PROMPTS_PER_DECODE} prompts a decode",
            {},
        ),
    ]
    if batches:  # ours decodes PROMPTS_PER_DECODE prompts at a time, whatever points_per_batch
        steps += [(f"  ours, prompts decoded {n} at a time", {"decode": n}) for n in (1, 8, 64)]
    for i, (label, change) in enumerate(steps):
        enc = s_enc if i < 2 else o_enc
        sam_module.PROMPTS_PER_DECODE = change.pop("decode", decode)
        try:
            _, _, prompts = run_ours(sam, dataclasses.replace(opts, **change), image, features)
        finally:
            sam_module.PROMPTS_PER_DECODE = decode
        row(label, enc, enc + prompts, None, "")
        if i == 1:
            label = "  + encoder: SDPA, rel-pos bias in row chunks, fused linears (= ours)"
            row(label, o_enc, o_enc + prompts, None, "")


@torch.inference_mode()
def take_apart(sam: Sam, opts: AmgOptions, image: np.ndarray) -> None:
    """One batch of prompts of image 0, stock's steps and ours, timed one by one."""
    gen = SamMaskGenerator(sam, dataclasses.replace(opts, fast_encoder=False))
    features = gen._embed(image)
    grid = amg.build_point_grid(opts.points_per_side)[: opts.points_per_batch] * 256
    coords = torch.as_tensor(gen.transform.apply_coords(grid, (256, 256)))
    labels = torch.ones((len(coords), 1), dtype=torch.int)
    sparse, dense = sam.prompt_encoder((coords[:, None], labels), None, None)
    pe = sam.prompt_encoder.get_dense_pe()
    (low, _), t_dec = seconds(lambda: sam.mask_decoder(features, pe, sparse, dense, True))
    up, t_up = seconds(lambda: sam.postprocess_masks(low, (1024, 1024), (256, 256)).flatten(0, 1))
    _, t_stab = seconds(lambda: amg.calculate_stability_score(up, 0.0, 1.0))
    binary, t_bin = seconds(lambda: up > 0)
    _, t_box = seconds(lambda: amg.batched_mask_to_box(binary))
    _, t_rle = seconds(lambda: [amg.rle_to_mask(r) for r in amg.mask_to_rle_pytorch(binary)])
    side, t_side = seconds(lambda: ImageSide(sam, features))
    (_, _, low2), t_ours = seconds(lambda: decode_masks(sam, side, sparse))
    with torch.no_grad(), torch.inference_mode(False):
        _, t_grad = seconds(lambda: decode_masks(sam, ImageSide(sam, features), sparse))
    mh, mw = gen._resize_matrices((256, 256), (256, 256))
    logits, t_mat = seconds(lambda: mh @ low2.flatten(0, 1) @ mw)
    print(
        f"one batch of {len(coords)} prompts, seconds: stock decoder {t_dec:.2f}, upsample "
        f"to 1024 and back {t_up:.2f}, stability {t_stab:.2f}, threshold {t_bin:.2f}, boxes "
        f"{t_box:.2f}, RLE encode + decode {t_rle:.2f}"
    )
    print(
        f"  ours: shared image side {t_side:.2f}, decoder {t_ours:.2f} (under no_grad instead "
        f"of inference_mode {t_grad:.2f}), resize matrices {t_mat:.2f}, max |logit diff| "
        f"{(logits.view_as(up) - up).abs().max():.1e}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 image (< 1 min)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--pps", type=int, default=16, help="points_per_side")
    parser.add_argument("--batch", type=int, default=64, help="points_per_batch")
    parser.add_argument(
        "--nms",
        type=float,
        default=0.9,
        help="box_nms_thresh (0.7 keeps 3 "
        "masks of random vit_b: its masks are nested variants of a few shapes)",
    )
    parser.add_argument("--mra", type=int, default=0, help="min_mask_region_area")
    parser.add_argument("--no-ablation", action="store_true", help="only the side-by-side runs")
    parser.add_argument(
        "--sam2",
        default="sam2.1_hiera_tiny",
        help="SAM 2.1 model to run as well (random weights), or none",
    )
    args = parser.parse_args()
    models, n_images = (["tiny"], 1) if args.quick else (["tiny", "vit_b"], args.images)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: each rank its share of the images, one thread each
        torch.distributed.init_process_group("gloo")
        args.no_ablation = True
    images = demo_images(n_images)[rank::world]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, pps {args.pps}, "
        f"points_per_batch {args.batch}, box_nms_thresh {args.nms}, min_mask_region_area "
        f"{args.mra}, {n_images} image(s) 256x256"
    )
    result = (1.0, 1.0)
    for name in models:
        print(f"\n{name:6} {'pipeline':58} {'encoder s':>9} {'total s':>8} {'masks':>5}  check")

        def row(label: str, enc: float, total: float, n: Any, note: str, name: str = name) -> None:
            print(
                f"{name:6} {label:58} {enc:9.2f} {total:8.2f} {'' if n is None else n:>5}  {note}"
            )

        result = bench_model(name, images, args, row)
    sam2_s = None
    if args.sam2 != "none":
        try:
            import sam2  # noqa: F401  (requirements.txt; an optional generator)
        except ImportError:
            print(f"\nsam2 is not installed: {args.sam2} skipped (pip install sam2==1.1.0)")
        else:
            print(f"\n{'sam2':6} {'pipeline':58} {'encoder s':>9} {'total s':>8} {'masks':>5}")

            def row2(label: str, enc: float, total: float, n: Any, note: str) -> None:
                print(f"{'sam2':6} {label:58} {enc:9.2f} {total:8.2f} {n:>5}  {note}")

            sam2_s = bench_sam2(args.sam2, images, args, row2)
    if world > 1:  # the job's throughput: all images over the slowest rank's seconds
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, result)
        stock_s, ours_s = max(p[0] for p in parts), max(p[1] for p in parts)
        if rank == 0:
            print(
                f"{world} processes, {n_images} images: stock {n_images / stock_s:.3f} "
                f"images/s, ours {n_images / ours_s:.3f} images/s"
            )
        result = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    if sam2_s is not None and world == 1:
        n = len(images)
        print(
            f"images/s side by side ({models[-1]} for SAM 1): stock SAM 1 {n / result[0]:.3f}, "
            f"ours SAM 1 {n / result[1]:.3f}, {args.sam2} {n / sam2_s:.3f}"
        )
    print(f"masks speedup: {result[0] / result[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
