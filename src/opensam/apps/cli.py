"""The ``opensam`` console script: ``opensam preset``, ``opensam predict``, ``opensam export-cvat``.

    opensam predict photos/ --out predictions/                # best student, params.yaml settings
    opensam export-cvat predictions/ --out review.zip --n 20  # least confident, for CVAT review

``predict`` input: a folder, searched recursively (hidden files and folders skipped), or a
``.txt`` file with one photo path per line (relative paths are relative to the list file, ``#``
starts a comment). Output layout: :mod:`opensam.apps.predict`. Heavy modules (torch) are imported
only by the subcommand that needs them, so ``opensam --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opensam.apps.photos import check_output_dir, list_photos
from opensam.errors import InputError, quote

log = logging.getLogger(__name__)

MASK_CHOICES = ("sam", "sam2", "demo_sam", "regions", "superpixels", "none")
MAX_PPS = 128  # the params rule of ``pps``
RGB = tuple[int, int, int]


def check_predict_flags(args: argparse.Namespace) -> None:
    """The flags that override params get the params' ranges (one line naming the flag)."""
    rules = (
        ("--batch-size", args.batch_size, lambda v: v >= 1, ">= 1"),
        ("--pps", args.pps, lambda v: 1 <= v <= MAX_PPS, f"in 1..{MAX_PPS}"),
        ("--min-region-area", args.min_region_area, lambda v: v >= 0, ">= 0"),
        ("--low-conf", args.low_conf, lambda v: 0 <= v <= 1, "in 0..1 (a probability)"),
    )
    for flag, value, ok, rule in rules:
        if value is not None and not ok(value):  # NaN fails every comparison
            raise InputError(f"{flag}: must be {rule}, got {quote(value)}")


def _cmd_preset(args: argparse.Namespace) -> int:
    from opensam.apps.presets import apply_preset_to_file

    changes = apply_preset_to_file(Path(args.params), args.name)
    for line in changes:
        log.info("%s: %s", args.params, line)
    log.info("%s: applied preset %r (%d value(s) changed)", args.params, args.name, len(changes))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from opensam.apps import predict
    from opensam.apps.guards import check_predict_out, output_lock
    from opensam.apps.predict_setup import build_mask_generator, choose_masks, overlay_colors
    from opensam.apps.predict_shards import predict_photos_sharded
    from opensam.config import load_params
    from opensam.model.segmenter import load_checkpoint
    from opensam.parallel.context import init_runtime
    from opensam.runtime import seed_everything

    check_predict_flags(args)
    params = load_params(args.params)
    seed_everything(params.seed)
    device = args.device or params.runtime.device  # torchrun: ranks share photos, rank 0 merges
    rt = init_runtime(dataclasses.replace(params.runtime, device=device))
    check_output_dir(args.input, args.out, data_source_paths(params.data.source, args.params))
    check_predict_out(args.out)
    listing = list_photos(args.input)
    model, meta = load_checkpoint(args.checkpoint, params.class_names, classes_from=args.params)
    size = int(meta["image_size"])
    ckpt = str(args.checkpoint)
    choice = choose_masks(meta, params, args.masks, args.pps, args.min_region_area, ckpt)
    masks = build_mask_generator(choice, params.masks, params.sam, size, params.sam2)
    colors = overlay_colors(params, meta)
    log.info(
        "%d photos, %s (%d px), masks %s pps %d",
        len(listing.photos),
        args.checkpoint,
        size,
        choice.generator,
        choice.pps,
    )
    low_conf = params.predict.low_conf if args.low_conf is None else args.low_conf
    with output_lock(args.out) if rt.is_main else contextlib.nullcontext(args.out):
        result = predict_photos_sharded(
            model,
            listing.photos,
            args.out,
            params.class_names,
            colors,
            size,
            masks,
            args.batch_size or params.predict.batch_size,
            low_conf,
            args.overwrite,
            listing.refused,
        )
        if not rt.is_main:
            return 0
        info = {"checkpoint": ckpt, "input": str(args.input), "masks": choice.generator}
        summary = predict.build_summary(result, params.class_names, colors, info)
        predict.write_summary(args.out, summary)
    log.info(
        "%d predicted (%.2f images/s), %d skipped, %d failed -> %s",
        result.processed,
        result.images_per_s,
        result.skipped,
        len(result.failed),
        args.out,
    )
    if not result.rows:
        raise InputError(f"{args.input}: no photo could be read (see {args.out}/failed.txt)")
    return 0


def read_summary(pred_dir: Path) -> dict[str, Any]:
    """``pred_dir/summary.json``, as written by ``opensam predict``."""
    from opensam.apps.predict import SUMMARY_NAME
    from opensam.runtime import read_json

    path = Path(pred_dir) / SUMMARY_NAME
    summary = read_json(path, "not an opensam predict output folder")
    if not isinstance(summary, dict) or not isinstance(summary.get("classes"), list):
        raise InputError(f"{path}: expected a mapping with a 'classes' list")
    return summary


def _rgb(colour: Sequence[int]) -> RGB:
    r, g, b = (int(v) for v in colour[:3])
    return (r, g, b)


def export_colors(pred_dir: Path, prepared: Path) -> tuple[list[str], list[RGB], str]:
    """Class names and labelmap colours for a CVAT export of ``pred_dir``.

    Colours: ``prepared/splits.json`` ``colors`` (the training data set's own labelmap.txt, so the
    export matches its CVAT project) when its classes equal the predictions'; else those of the
    predict run (params ``classes[].color``). Returns (names, colours, the file they came from).
    """
    from opensam.prepared import SPLITS_NAME, read_prepared

    summary = read_summary(pred_dir)
    names = [str(n) for n in summary["classes"]]
    if (Path(prepared) / SPLITS_NAME).is_file():
        prep = read_prepared(prepared)
        if list(prep.classes) == names and prep.colors:
            return names, list(prep.colors), str(prep.splits_path)
        log.warning(
            "%s: other classes than the predictions; its colours are not used", prep.splits_path
        )
    return names, [_rgb(c) for c in summary["colors"]], str(Path(pred_dir) / "summary.json")


def export_least_confident(
    pred_dir: Path,
    out: Path,
    n: int,
    class_names: Sequence[str],
    colors: Sequence[RGB],
    images: Mapping[str, Path] | None = None,
) -> list[str]:
    """Write the ``n`` predictions of ``pred_dir`` with the lowest mean confidence (ties: by id)
    as a CVAT Segmentation Mask 1.1 export (``out``: a .zip or a folder) with the photos, from
    ``images`` (id -> path) when given, else from the CSV paths. Returns the exported ids.
    """
    from opensam.apps.predict import LABELS_DIR
    from opensam.apps.predictions_csv import CSV_NAME, read_rows
    from opensam.data.cvat import write_cvat_export
    from opensam.images import read_label_png

    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    rows = sorted(
        read_rows(pred_dir).values(), key=lambda r: (float(r["mean_confidence"]), r["id"])
    )
    if not rows:
        raise InputError(f"{Path(pred_dir) / CSV_NAME}: no predictions to export")
    chosen = rows[:n]
    photos = {
        r["id"]: Path(images[r["id"]] if images and r["id"] in images else r["path"])
        for r in chosen
    }
    for image_id, photo in photos.items():
        if not photo.is_file():
            raise InputError(f"{photo}: photo of prediction {image_id} not found (use --images)")
    items = (
        (i, photos[i], read_label_png(Path(pred_dir) / LABELS_DIR / f"{i}.png")) for i in photos
    )
    write_cvat_export(out, list(class_names), list(colors), items)
    return list(photos)


def _cmd_export_cvat(args: argparse.Namespace) -> int:
    from opensam.apps.guards import check_export_target

    inputs = {
        "photos folder": args.images,
        "prepared data": args.prepared,
        **data_source_paths(params_data_source(args.params), args.params),
    }
    check_export_target(args.out, args.pred_dir, args.overwrite, inputs)
    names, colors, origin = export_colors(args.pred_dir, args.prepared)
    log.info("labelmap colours from %s", origin)
    images = None
    if args.images is not None:
        images = {p.id: p.path for p in list_photos(args.images).photos}
    ids = export_least_confident(args.pred_dir, args.out, args.n, names, colors, images)
    log.info("wrote %s: the %d least confident predictions", args.out, len(ids))
    return 0


def data_source_paths(source: str | None, params: Path) -> dict[str, Path | None]:
    """``data.source`` as the stages read it (relative to the current folder, the DVC root)
    and, when the params file lies elsewhere, relative to the params file's folder."""
    if not source:
        return {}
    paths: dict[str, Path | None] = {"data.source": Path(source)}
    beside = Path(params).parent / source
    if os.path.realpath(beside) != os.path.realpath(source):
        paths[f"data.source of {params}"] = beside
    return paths


def params_data_source(path: Path) -> str | None:
    """``data.source`` of the params file at ``path`` (None when there is none), read without
    validating the rest: an output must never replace the labelled data."""
    import yaml

    from opensam.config import read_yaml

    try:
        raw = read_yaml(path.read_text(), str(path))
    except FileNotFoundError:  # no params file: no labelled data to protect
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read data.source ({type(exc).__name__})") from None
    data = raw.get("data") if isinstance(raw, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    return source if isinstance(source, str) and source else None


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="label photos with a trained model (class maps, overlays, CSV)",
        description="Label photos with a trained model. INPUT: a folder (searched recursively) or "
        "a .txt list of photo paths (relative to the list file). Writes DIR/labels/<id>.png "
        "(class ids at the original size), overlays/<id>.jpg, predictions.csv, failed.txt and "
        "summary.json. Photos already predicted in DIR are skipped unless --overwrite.",
    )
    p.add_argument("input", type=Path, help="folder of photos, or a .txt file of photo paths")
    p.add_argument("--out", type=Path, required=True, help="output folder DIR (not inside INPUT)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("models/student.pt"),
        help="model checkpoint (default: the best student, models/student.pt)",
    )
    p.add_argument(
        "--masks",
        choices=MASK_CHOICES,
        default=None,
        help="region masks (default: the checkpoint's training generator); none = per pixel",
    )
    p.add_argument(
        "--pps", type=int, default=None, help="points per side (default: the checkpoint's)"
    )
    p.add_argument(
        "--min-region-area", type=int, default=None, help="pixels (default: the checkpoint's)"
    )
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="classes, colours, mask settings (pps, min_region_area, masks, sam)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: predict.batch_size")
    p.add_argument(
        "--low-conf",
        type=float,
        default=None,
        help="max probability below which a pixel is low-confidence (predict.low_conf)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo photos already predicted")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (runtime.device)")
    p.set_defaults(func=_cmd_predict)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export-cvat",
        help="export the N least confident predictions as CVAT Segmentation Mask 1.1",
        description="Write the N predictions with the lowest mean confidence as a CVAT "
        "Segmentation Mask 1.1 export, to upload to a CVAT task as annotations and correct. "
        "Labelmap colours: PREPARED/splits.json (the training data set's labelmap) when its "
        "classes match, else the colours the predict run used (params classes).",
    )
    p.add_argument("pred_dir", type=Path, help="output folder of opensam predict")
    p.add_argument("--out", type=Path, required=True, help="export .zip (or a folder)")
    p.add_argument("--n", type=int, default=20, help="number of predictions (default 20)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing .zip, or a folder written by an earlier export-cvat",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="the predict INPUT again, if the photos moved (default: the CSV paths)",
    )
    p.add_argument(
        "--prepared",
        type=Path,
        default=Path("data/prepared"),
        help="prepared data whose splits.json gives the labelmap colours",
    )
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params whose data.source (the labelled data) --out must never touch",
    )
    p.set_defaults(func=_cmd_export_cvat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opensam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preset", help="apply a named params preset (e.g. thesis) to params.yaml")
    p.add_argument("name", help="preset name: thesis")
    p.add_argument("--params", default="params.yaml", help="params file to rewrite")
    p.set_defaults(func=_cmd_preset)
    _add_predict(sub)
    _add_export(sub)
    p = sub.add_parser(
        "report",
        help="mean ± std over seeds of the finished DVC experiments (test mIoU, gain)",
        description="Read the baseline (HEAD) and the DVC experiments (refs/exps), identical "
        "params once; one row per group differing only in seed: mean ± std of the test mIoU of "
        "control, teacher, student, the gain (student - control) on test and val, and the "
        "pseudo-label mIoU against the hidden ground truth.",
    )
    p.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository")
    p.add_argument(
        "--write",
        type=Path,
        default=None,
        metavar="PAGE",
        help="write the results page's experiments section into PAGE (e.g. docs/results.md): "
        "one row per labelled count, ratio and mode, with the oracle, the gap closed, the "
        "pseudo-label coverage and each row's dvc exp run command",
    )
    p.add_argument(
        "--archive",
        type=Path,
        default=None,
        metavar="FILE",
        help="merge the runs saved in FILE (a JSON file, e.g. docs/results.json) with the "
        "repository's, a run from git replacing a saved one with the same params, and save them "
        "back: the page can be rebuilt where the experiments' refs are gone",
    )
    p.set_defaults(func=_cmd_report)
    return parser


def _cmd_report(args: argparse.Namespace) -> int:
    from opensam.apps.report import (
        format_report,
        format_results_page,
        load_archive,
        merge_runs,
        read_experiments,
        save_archive,
        with_new_params,
        write_results_page,
    )

    runs = read_experiments(args.repo)
    baseline = next((r for r in runs if r.name == "HEAD"), None)
    runs = with_new_params(runs, baseline)
    if args.archive is not None:
        saved = load_archive(args.archive)  # before anything is written: a bad file stops here
        runs = merge_runs(runs, with_new_params(saved, baseline))
        save_archive(args.archive, runs)
        log.info("%s: %d runs (%d saved before)", args.archive, len(runs), len(saved))
    if args.write is None:
        sys.stdout.write(format_report(runs) + "\n")  # the output, not a log
        return 0
    write_results_page(args.write, format_results_page(runs, baseline))
    log.info("%s: %d runs written", args.write, len(runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)  # before importing torch: --help stays instant
    from opensam.runtime import setup_logging

    setup_logging()
    try:
        return int(args.func(args))
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # a full disk or a read-only folder outside an atomic write
        from opensam.runtime import os_error_line

        if (line := os_error_line(exc)) is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
