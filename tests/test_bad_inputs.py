# ruff: noqa: E501  (the registry is a table: one case per line)
"""The bad-input registry: every refused input, through the entry point a user runs.

Each case copies one tiny project (a CVAT export, an unlabelled pool, prepared data, a mask
store, a checkpoint, an earlier prediction folder), breaks one thing, runs the stage script
(``run_main(stage.main)``, as ``python stages/x.py`` does) or the ``opensam`` CLI in process,
and asserts: exit code 2, exactly one line ``error: <file>: <problem>`` naming the file, no
traceback, and the whole project tree unchanged (nothing written, nothing deleted).
The tests after the registry cover what must *work* (id clashes, concurrent runs, resume,
preset layout).
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from opensam.apps import launch
from opensam.apps.cli import main as cli_main
from opensam.config import ClipParams
from opensam.data.cvat import write_cvat_export
from opensam.model.segmenter import build_model, save_checkpoint
from opensam.runtime import run_main

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["lizard", "hand", "color board", "background"]
COLOURS = [(250, 220, 40), (40, 200, 60), (40, 90, 230), (0, 0, 0)]
H, W, SIZE = 30, 40, 32
PARAMS = {
    "seed": 0,
    "image_size": SIZE,
    "pps": 4,
    "ratio": 1,
    "classes": [{"name": n, "prompt": f"a {n}"} for n in NAMES],
    "data": {"source": "raw", "format": "cvat", "unlabelled": "pool", "unlabelled_gt": None,
             "split": {"train": 6, "val": 2, "test": 2}, "unknown_colour_max_pixels": 5},
    "masks": {"generator": "superpixels", "max_ratio": 8},
    "clip": {"model": "opensam-tiny", "pretrained": None},
    "warmup": {"epochs": 1, "batch_size": 4, "lr_max": 0.002, "lr_min": 0.0001},
}  # fmt: skip
WARMUP = ["--prepared", "data/prepared", "--masks", "data/masks.h5", "--data-metrics",
          "metrics/data.json", "--out", "models/teacher.pt", "--metrics", "metrics/warmup.json",
          "--live", "live/warmup"]  # fmt: skip
PREPARE = ["--out", "data/prepared", "--metrics", "metrics/data.json"]
MASKS = ["--prepared", "data/prepared", "--out", "data/masks.h5"]
PREDICT = ["predict", "photos", "--out", "preds", "--checkpoint", "models/student.pt",
           "--masks", "none"]  # fmt: skip
EXPORT = ["export-cvat", "preds", "--n", "1", "--prepared", "data/prepared"]


def load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bad_{name}", ROOT / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAGES = {name: load_stage(name) for name in ("prepare", "masks", "warmup")}


def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.full((H, W), 3, np.uint8)
    label[5:20, 8:30] = 0
    label[20:, :12] = 1
    label[:6, 30:] = 2
    photo = np.array(COLOURS, np.uint8)[label] // 2 + rng.integers(0, 60, (H, W, 3), np.uint8)
    return photo, label


def invoke(entry: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``opensam <argv>``, ``python -m opensam.apps.launch <argv>`` or ``python
    stages/<entry>.py <argv>`` in process."""
    if entry == "cli":
        return cli_main(argv)
    if entry == "launch":
        with pytest.raises(SystemExit) as done:
            run_main(lambda _: launch.main(argv))
        return int(done.value.code or 0)
    monkeypatch.setattr(sys, "argv", [f"stages/{entry}.py", *argv])
    with pytest.raises(SystemExit) as done:
        run_main(STAGES[entry].main)
    return int(done.value.code or 0)


def tree(root: Path) -> dict[str, str]:
    """Every file (and symlink) under ``root`` with a hash of its content."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*files, *(d for d in dirs if Path(dirpath, d).is_symlink())]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif not path.is_file():
                out[rel] = "special file"  # a FIFO: never opened
            else:
                out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENSAM_THREADS", "1")
        mp.setenv("OPENSAM_WORKERS", "1")
        yield
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "project"
    root.mkdir()
    write_cvat_export(root / "raw", NAMES, COLOURS, [(f"img{i:02d}", *scene(i)) for i in range(10)])
    for marker in (root / "raw").glob(".opensam*"):  # as if exported by CVAT itself
        marker.unlink()
    (root / "pool").mkdir()
    for i in range(4):
        Image.fromarray(scene(50 + i)[0]).save(root / "pool" / f"u{i}.jpg")
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(scene(90 + i)[0]).save(root / "photos" / f"p{i}.png")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert invoke("prepare", PREPARE, mp) == 0
        assert invoke("masks", MASKS, mp) == 0
        model = build_model(ClipParams(pretrained=None), [c["prompt"] for c in PARAMS["classes"]])
        save_checkpoint("models/student.pt", model, NAMES, ClipParams(pretrained=None), SIZE)
        assert invoke("cli", PREDICT, mp) == 0
    return root


@pytest.fixture()
def project(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def set_params(root: Path, **changes: object) -> None:
    """Change params.yaml: ``warmup__batch_size=0`` sets ``warmup.batch_size``."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        node, *path, last = [raw, *key.split("__")]
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def edit_labelmap(root: Path, text: str) -> None:
    (root / "raw" / "labelmap.txt").write_text(text)


def bad_checkpoint(root: Path, **changes: object) -> None:
    ckpt = torch.load(root / "models" / "student.pt", weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, root / "models" / "student.pt")


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PIL save writes half its bytes, then fails as on a full disk."""
    real_save = Image.Image.save

    def save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        real_save(self, fp, *args, **kwargs)
        data = Path(str(fp)).read_bytes()
        Path(str(fp)).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)


def full_disk_text(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def write_text(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def read_only(folder: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Creating anything inside ``folder`` fails as on a read-only file system (root ignores
    chmod, so the file system calls are patched)."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        target = os.path.abspath(folder)
        real_open, real_mkdir = os.open, os.mkdir

        def inside(path: object) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(target + os.sep)  # type: ignore[arg-type]

        def fake_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))  # type: ignore[arg-type]
            return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

        def fake_mkdir(path: object, *args: object, **kwargs: object) -> None:
            if inside(path):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))  # type: ignore[arg-type]
            real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    return patch


@dataclass(frozen=True)
class Case:
    """``setup(root)`` breaks the project; ``patch(monkeypatch)`` injects a fault."""

    entry: str
    argv: list[str]
    setup: Callable[[Path], object] | None
    file: str  # the message's first field ends with this
    problem: str  # a fragment of the rest
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return do


def zip_export(root: Path, extra: dict[str, bytes]) -> None:
    with zipfile.ZipFile(root / "raw.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted((root / "raw").rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(root / "raw").as_posix())
        for name, data in extra.items():
            z.writestr(name, data)
    set_params(root, data__source=str(root / "raw.zip"))  # open_zip caches by path


def zip_with_big_labelmap(root: Path) -> None:
    shutil.move(root / "raw" / "labelmap.txt", root / "labelmap.txt")
    big = (root / "labelmap.txt").read_bytes() + b"#" * (17 << 20)
    zip_export(root, {"labelmap.txt": big})


def symlink(rel: str, target: str, move_to: str | None = None) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        link = root / rel
        if move_to is not None:
            shutil.move(link, root / move_to)
        elif link.exists():
            link.unlink()
        link.symlink_to(target)

    return do


def unknown_colour(root: Path) -> None:
    path = root / "raw" / "SegmentationClass" / "img03.png"
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    rgb[:10, :10] = (12, 200, 7)
    Image.fromarray(rgb).save(path)


def truncated_photo(root: Path) -> None:
    path = next((root / "raw" / "JPEGImages").glob("img04.*"))
    path.write_bytes(path.read_bytes()[:200])


def ids_listed_twice(root: Path) -> None:
    lst = root / "raw" / "ImageSets" / "Segmentation" / "default.txt"
    lst.write_text(lst.read_text() + "img01\n")


def evil_resume(root: Path) -> None:
    write("models/.warmup_ckpt/last.pt", pickle.dumps(Evil()))(root)


def export_dir(root: Path) -> None:
    (root / "k" / "sub").mkdir(parents=True)
    (root / "k" / "sub" / "a.txt").write_text("x")


def edit_csv(field: str, value: str) -> Callable[[Path], None]:
    """Hand-edit the first row of ``preds/predictions.csv``: ``field`` becomes ``value``."""

    def do(root: Path) -> None:
        path = root / "preds" / "predictions.csv"
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames
        rows[0][field] = value
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields or [])
            writer.writeheader()
            writer.writerows(rows)

    return do


def fixture(name: str) -> bytes:
    return (ROOT / "tests" / "fixtures" / name).read_bytes()


def append(rel: str, text: str) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        with (root / rel).open("a") as f:
            f.write(text)

    return do


def move_photos(rel: str) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / "photos", root / rel)

    return do


def clip_weights_file(obj: object) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        torch.save(obj, root / "models" / "clip.pt")
        set_params(root, clip__pretrained="models/clip.pt")

    return do


def nan_weights(root: Path) -> None:
    ckpt = torch.load(root / "models" / "student.pt", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    torch.save(ckpt, root / "models" / "student.pt")


def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun is never started: the launcher must refuse before it would exec it."""

    def execv(path: str, args: list[str]) -> None:
        raise SystemExit(1)

    monkeypatch.setattr(os, "execv", execv)


EMPTY_ZIP = b"PK\x05\x06" + bytes(18)
STAGE_WARMUP = str(ROOT / "stages" / "warmup.py")
P = "params.yaml"
CASES: dict[str, Case] = {
    # --- params, validated once at load (issue 13 item 7, issue 9 item 5) --------------------
    "seed-negative": Case("prepare", PREPARE, lambda r: set_params(r, seed=-5), P, "seed: must be >= 0"),
    "unknown-colour-max-negative": Case("prepare", PREPARE, lambda r: set_params(r, data__unknown_colour_max_pixels=-1), P, "data.unknown_colour_max_pixels: must be >= 0"),
    "image-size-huge": Case("prepare", PREPARE, lambda r: set_params(r, image_size=100000), P, "image_size: must be in 32..2048, got 100000"),
    "colour-out-of-range": Case("prepare", PREPARE, lambda r: set_params(r, classes=[{"name": "lizard", "prompt": "a", "color": [300, -1, 0]}, *PARAMS["classes"][1:]]), P, "classes[0].color: must be three values in 0..255"),  # type: ignore[misc]
    "predict-batch-size-0": Case("cli", PREDICT, lambda r: set_params(r, predict__batch_size=0), P, "predict.batch_size: must be >= 1"),
    "split-train-1.0": Case("prepare", PREPARE, lambda r: set_params(r, data__split={"train": 1.0, "val": 2, "test": 2}), P, "data.split.train: must be a count"),
    "split-fractions-over-1": Case("prepare", PREPARE, lambda r: set_params(r, data__split={"train": 0.7, "val": 0.5, "test": 0}), P, "data.split: must be fractions that sum to at most 1"),
    "ratio-above-max-ratio": Case("warmup", WARMUP, lambda r: set_params(r, ratio=9), P, "ratio: must be in 0..masks.max_ratio"),
    "labelled-train-0": Case("prepare", PREPARE, lambda r: set_params(r, labelled_train=0), P, "labelled_train: must be null (the whole train split) or >= 1, got 0"),
    "labelled-train-above-train-split": Case("warmup", WARMUP, lambda r: set_params(r, labelled_train=7), P, "labelled_train: must be in 1..6 (the train split of data/prepared/splits.json), got 7"),
    "duplicate-class-case": Case("prepare", PREPARE, lambda r: set_params(r, classes=[*PARAMS["classes"], {"name": "Lizard", "prompt": "x"}]), P, "classes[4].name: 'Lizard' repeats classes[0].name"),  # type: ignore[misc]
    "unknown-top-level-key": Case("prepare", PREPARE, lambda r: set_params(r, foo=1), P, "unknown key(s) foo"),
    "warmup-batch-size-0": Case("warmup", WARMUP, lambda r: set_params(r, warmup__batch_size=0), P, "warmup.batch_size: must be >= 1"),
    "pseudo-batch-size-0": Case("prepare", PREPARE, lambda r: set_params(r, pseudo__batch_size=0), P, "pseudo.batch_size: must be >= 1"),
    "student-t1-after-t2": Case("prepare", PREPARE, lambda r: set_params(r, student__t1=0.9, student__t2=0.5), P, "student.t1: must be in 0..t2"),
    "class-weights-length": Case("prepare", PREPARE, lambda r: set_params(r, warmup__class_weights=[1.0, 2.0]), P, "warmup.class_weights: must be 4 weights"),
    "sam-threshold-above-1": Case("masks", MASKS, lambda r: set_params(r, sam__pred_iou_thresh=1.5), P, "sam.pred_iou_thresh: must be in 0..1"),
    "data-format-unknown": Case("prepare", PREPARE, lambda r: set_params(r, data__format="coco"), P, "data.format: must be cvat or voc"),
    "pseudo-conf-threshold-2": Case("prepare", PREPARE, lambda r: set_params(r, pseudo__conf_threshold=2.0), P, "pseudo.conf_threshold: must be null or in 0..1"),
    "pps-zero": Case("masks", MASKS, lambda r: set_params(r, pps=0), P, "pps: must be in 1..128"),
    "params-not-a-mapping": Case("prepare", PREPARE, write(P, "- a\n- b\n"), P, "expected a mapping at the top level"),
    "params-python-tag": Case("prepare", PREPARE, write(P, "seed: !!python/object/apply:os.system ['touch pwned']\n"), P, "not valid YAML"),
    # --- opensam preset (item 9) ---------------------------------------------------------------
    "preset-empty-params": Case("cli", ["preset", "thesis"], write(P, ""), P, "is empty"),
    "preset-invalid-yaml": Case("cli", ["preset", "thesis"], write(P, "a: [\n"), P, "not valid YAML"),
    "preset-unknown-key": Case("cli", ["preset", "thesis"], lambda r: set_params(r, foo=1), P, "unknown key(s) foo"),
    # --- export-cvat never deletes what it did not write (item 1) ------------------------------
    "export-into-non-empty-folder": Case("cli", [*EXPORT, "--out", "k"], export_dir, "k", "exists and is not empty"),
    "export-overwrite-foreign-folder": Case("cli", [*EXPORT, "--out", "k", "--overwrite"], export_dir, "k", "not a folder written by opensam export-cvat"),
    "export-into-labelled-data": Case("cli", [*EXPORT, "--out", "raw", "--overwrite"], None, "raw", "is the data.source"),
    "export-over-existing-zip": Case("cli", [*EXPORT, "--out", "review.zip"], write("review.zip", b"PK\x05\x06" + bytes(18)), "review.zip", "exists; pass --overwrite"),
    "export-out-parent": Case("cli", [*EXPORT, "--out", ".."], None, "..", "holds the predictions folder or the current folder"),
    "export-out-is-predictions": Case("cli", [*EXPORT, "--out", "preds"], None, "preds", "holds the predictions folder"),
    "export-out-is-a-file": Case("cli", [*EXPORT, "--out", "notes.txt"], write("notes.txt", "mine"), "notes.txt", "is a file; --out must be a .zip or a folder"),
    "export-overwrite-non-zip": Case("cli", [*EXPORT, "--out", "x.zip", "--overwrite"], write("x.zip", "not a zip"), "x.zip", "is not a zip file"),
    # --- output-write failures (item 8) --------------------------------------------------------
    "predict-out-is-a-file": Case("cli", [*PREDICT[:2], "--out", "notes.txt", *PREDICT[4:]], write("notes.txt", "mine"), "notes.txt", "is a file; --out must be a folder"),
    "predict-read-only-out": Case("cli", [*PREDICT[:2], "--out", "ro/preds", *PREDICT[4:]], write("ro/.keep", ""), "ro/preds", "Read-only file system", read_only("ro")),
    "predict-full-disk": Case("cli", PREDICT, lambda r: Image.fromarray(scene(99)[0]).save(r / "photos" / "p9.png"), "p9.png", "No space left on device", full_disk),
    "prepare-full-disk": Case("prepare", PREPARE, None, "data/prepared", "No space left on device", full_disk_text),
    "export-parent-is-a-file": Case("cli", [*EXPORT, "--out", "notes.txt/review.zip"], write("notes.txt", "mine"), "notes.txt/review.zip", "cannot write"),
    # --- import: zip, symlinks, labelmap, ids (items 6, 9 and earlier cases) -------------------
    "zip-labelmap-decompresses-huge": Case("prepare", PREPARE, zip_with_big_labelmap, "raw.zip", "decompressed"),
    "zip-unsafe-member": Case("prepare", PREPARE, lambda r: zip_export(r, {"../evil.txt": b"x"}), "raw.zip", "unsafe member path '../evil.txt'"),
    "symlink-labelmap-outside": Case("prepare", PREPARE, symlink("raw/labelmap.txt", "/etc/passwd"), "raw/labelmap.txt", "symlink points outside the export"),
    "symlinked-images-folder": Case("prepare", PREPARE, symlink("raw/JPEGImages", "imgs", move_to="raw/imgs"), "raw/JPEGImages", "symlinked folder"),
    "fifo-in-export": Case("prepare", PREPARE, lambda r: ((r / "raw" / "labelmap.txt").unlink(), os.mkfifo(r / "raw" / "labelmap.txt")), "raw/labelmap.txt", "not a regular file"),
    "labelmap-foreign-content": Case("prepare", PREPARE, lambda r: edit_labelmap(r, "root:x:0:0:root:/root:/bin/bash\n"), "raw/labelmap.txt", "line 1: expected 'name:r,g,b::'"),
    "labelmap-missing": Case("prepare", PREPARE, lambda r: (r / "raw" / "labelmap.txt").unlink(), "raw/labelmap.txt", "labelmap not found"),
    "labelmap-duplicate-name": Case("prepare", PREPARE, lambda r: edit_labelmap(r, "lizard:1,2,3::\nLizard:4,5,6::\n"), "raw/labelmap.txt", "line 2: empty or duplicate label name"),
    "labelmap-lacks-a-class": Case("prepare", PREPARE, lambda r: edit_labelmap(r, "lizard:250,220,40::\nhand:40,200,60::\n"), "raw/labelmap.txt", "class 'color board' from params is not in the labelmap"),
    "colour-not-in-labelmap": Case("prepare", PREPARE, unknown_colour, "img03.png", "colour (12,200,7) is not in labelmap.txt"),
    "truncated-photo": Case("prepare", PREPARE, truncated_photo, "img04.jpg", "cannot read image"),
    "id-listed-twice": Case("prepare", PREPARE, ids_listed_twice, "default.txt", "id 'img01' is listed twice"),
    # --- checkpoints and SAM (items 9, 10) -----------------------------------------------------
    "checkpoint-image-size-huge": Case("cli", PREDICT, lambda r: bad_checkpoint(r, image_size=100000), "models/student.pt", "bad 'image_size' 100000"),
    "checkpoint-text-width": Case("cli", PREDICT, lambda r: bad_checkpoint(r, text_embeddings=torch.zeros(4, 7)), "models/student.pt", "text embeddings have D=7"),
    "checkpoint-text-1d": Case("cli", PREDICT, lambda r: bad_checkpoint(r, text_embeddings=torch.zeros(4)), "models/student.pt", "bad 'text_embeddings'"),
    "checkpoint-malicious-pickle": Case("cli", PREDICT, write("models/student.pt", pickle.dumps(Evil())), "models/student.pt", "not a readable checkpoint"),
    "checkpoint-missing": Case("cli", [*PREDICT[:4], "--checkpoint", "models/none.pt", "--masks", "none"], None, "models/none.pt", "checkpoint not found"),
    "checkpoint-other-classes": Case("cli", PREDICT, lambda r: set_params(r, classes=[{"name": n, "prompt": n} for n in ("cat", "dog", "bird", "sky")]), "models/student.pt", "differ from params.yaml"),
    "checkpoint-masks-entry-a-list": Case("cli", PREDICT[:-2], lambda r: bad_checkpoint(r, masks=[1, 2]), "models/student.pt", "bad 'masks' entry [1, 2]"),
    "clip-pretrained-holds-a-list": Case("warmup", WARMUP, clip_weights_file([1, 2]), "models/clip.pt", "cannot load as opensam-tiny weights"),
    "checkpoint-nan-weights": Case("cli", PREDICT, nan_weights, "models/student.pt", "weights hold NaN or infinite values"),
    # --- a second hostile pass (issue 22): outputs never touch inputs -------------------------
    "predict-input-inside-out": Case("cli", ["predict", "shoot/labels", "--out", "shoot", *PREDICT[4:]], move_photos("shoot/labels"), "shoot", "holds the input folder"),
    "predict-out-is-data-source-link": Case("cli", [*PREDICT[:2], "--out", "link", *PREDICT[4:]], symlink("link", "raw"), "link", "is the data.source"),
    "predict-out-inside-data-source": Case("cli", [*PREDICT[:2], "--out", "raw/preds", *PREDICT[4:]], None, "raw/preds", "is inside the data.source"),
    "export-overwrite-data-source-zip": Case("cli", [*EXPORT, "--out", "raw.zip", "--overwrite"], lambda r: zip_export(r, {}), "raw.zip", "is the data.source"),
    "export-overwrite-foreign-zip": Case("cli", [*EXPORT, "--out", "review.zip", "--overwrite"], write("review.zip", EMPTY_ZIP), "review.zip", "not a zip written by opensam export-cvat"),
    "predictions-csv-odd-id": Case("cli", [*EXPORT, "--out", "r.zip"], edit_csv("id", "../../p0"), "preds/predictions.csv", "line 2: id '../../p0' is not a plain file name"),
    "predictions-csv-nan": Case("cli", [*EXPORT, "--out", "r.zip"], edit_csv("mean_confidence", "nan"), "preds/predictions.csv", "line 2: mean_confidence must be in 0..1"),
    # --- params: YAML, numbers and sizes (issue 22) ---------------------------------------------
    "params-alias-bomb": Case("prepare", PREPARE, write(P, fixture("params_alias_bomb.yaml")), P, "expands to over 100000 values"),
    "params-nested-too-deeply": Case("prepare", PREPARE, write(P, "seed: " + "[" * 5000 + "]" * 5000), P, "nested too deeply"),
    "params-duplicate-key": Case("prepare", PREPARE, append(P, "seed: 1\n"), P, "duplicate key 'seed'"),
    "params-not-utf8": Case("prepare", PREPARE, write(P, b"seed: \xff\n"), P, "not UTF-8 text"),
    "params-huge-string-quoted-short": Case("prepare", PREPARE, lambda r: set_params(r, seed="9" * 10**6), P, "seed: expected an integer, got '999"),
    "seed-huge": Case("prepare", PREPARE, lambda r: set_params(r, seed=2**70), P, "seed: must be >= 0 and < 2**32"),
    "lr-max-inf": Case("warmup", WARMUP, lambda r: set_params(r, warmup__lr_max=float("inf")), P, "warmup.lr_max: must be a finite number"),
    "warmup-loss-diverges": Case("warmup", WARMUP, lambda r: set_params(r, warmup__lr_max=1e30), P, "warmup: epoch 1: the training loss is not finite"),
    "image-size-31": Case("prepare", PREPARE, lambda r: set_params(r, image_size=31), P, "image_size: must be in 32..2048, got 31"),
    "launch-nproc-2-bad-param": Case("launch", ["--nproc", "2", STAGE_WARMUP, *WARMUP], lambda r: set_params(r, warmup__batch_size=0), P, "warmup.batch_size: must be >= 1", no_exec),
    "launch-missing-script": Case("launch", ["--nproc", "2", "stages/none.py"], None, "stages/none.py", "script not found", no_exec),
    # --- predict flags get the ranges of the params they override (issue 22) --------------------
    "predict-flag-pps-0": Case("cli", [*PREDICT, "--pps", "0"], None, "--pps", "must be in 1..128"),
    "predict-flag-min-region-area": Case("cli", [*PREDICT, "--min-region-area", "-100"], None, "--min-region-area", "must be >= 0"),
    "predict-flag-low-conf-nan": Case("cli", [*PREDICT, "--low-conf", "nan"], None, "--low-conf", "must be in 0..1"),
    "sam-checkpoint-missing": Case("masks", MASKS, lambda r: set_params(r, masks__generator="sam", sam__model="vit_b", sam__checkpoint="models/sam_vit_b_01ec64.pth"), "models/sam_vit_b_01ec64.pth", "download"),
    "sam2-checkpoint-missing": Case("masks", MASKS, lambda r: set_params(r, masks__generator="sam2", sam2__model="sam2.1_hiera_small", sam2__checkpoint="models/sam2.1_hiera_small.pt"), "models/sam2.1_hiera_small.pt", "download https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt"),
    "sam2-model-unknown": Case("masks", MASKS, lambda r: set_params(r, masks__generator="sam2", sam2__model="sam2_hiera_xl"), P, "sam2.model: must be one of sam2.1_hiera_tiny"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_outputs_intact(
    name: str, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    case = CASES[name]
    if case.setup is not None:
        case.setup(project)
    before = tree(project)
    if case.patch is not None:
        case.patch(monkeypatch)
    capsys.readouterr()
    code = invoke(case.entry, case.argv, monkeypatch)
    monkeypatch.undo()  # the fault injection, before reading the tree back
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    where, _, problem = errors[0].removeprefix("error: ").partition(": ")
    assert where.endswith(case.file) and not problem.startswith(":"), errors[0]
    assert case.problem in problem, errors[0]
    assert len(errors[0]) < 400, "a message quotes a value in full"
    assert tree(project) == before, "outputs changed or temporaries left behind"
    assert not (project / "pwned").exists()


def test_registry_covers_every_entry_point_once_per_problem() -> None:
    """Every entry point that reads user files has cases, and no two cases test the same
    problem of the same entry point (a copied case would inflate the registry, not cover more)."""
    assert {c.entry for c in CASES.values()} >= {"prepare", "masks", "warmup", "cli"}
    keys = [(c.entry, c.file, c.problem) for c in CASES.values()]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, repeated


def test_labelmap_error_quotes_no_content(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    edit_labelmap(project, "root:x:0:0:root:/root:/bin/bash\n")
    assert invoke("prepare", PREPARE, monkeypatch) == 2
    assert "/bin/bash" not in capsys.readouterr().err


def test_sam_hint_says_where_to_get_the_file(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    CASES["sam-checkpoint-missing"].setup(project)  # type: ignore[misc]
    assert invoke("masks", MASKS, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "https://dl.fbaipublicfiles.com/segment_anything/" in err and "null" not in err


# --- what must work ---------------------------------------------------------------------------


def csv_ids(out: Path) -> list[str]:
    lines = (out / "predictions.csv").read_text().splitlines()[1:]
    return sorted(line.split(",")[0] for line in lines)


def test_predict_id_clashes_keep_every_photo(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    src = project / "clash"
    (src / "sub").mkdir(parents=True)
    photo = Image.fromarray(scene(7)[0])
    for rel in ("a.jpg", "a.JPG", "sub/inner.jpg", "sub__inner.jpg"):
        photo.save(src / rel, format="JPEG")
    assert invoke("cli", ["predict", "clash", *PREDICT[2:4], "--checkpoint", "models/student.pt", "--masks", "none"], monkeypatch) == 0  # fmt: skip
    ids = csv_ids(project / "preds")
    new = [i for i in ids if i not in ("p0", "p1")]
    assert len(new) == 4 and len({i.casefold() for i in new}) == 4, new
    assert len(list((project / "preds" / "labels").glob("*.png"))) == 6


def test_predict_into_a_locked_folder_stops_with_one_line(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from opensam.apps.guards import output_lock

    before = tree(project / "preds")
    with output_lock(project / "preds"):
        assert invoke("cli", [*PREDICT, "--overwrite"], monkeypatch) == 2
        before[".opensam.lock"] = tree(project / "preds")[".opensam.lock"]
        assert tree(project / "preds") == before
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "is in use by another opensam predict" in errors[0]
    assert not (project / "preds" / ".opensam.lock").exists()


def test_stale_lock_is_taken_over(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"pid": dead.pid, "host": socket.gethostname(), "started": 0}
    (project / "preds" / ".opensam.lock").write_text(json.dumps(lock))
    assert invoke("cli", [*PREDICT, "--overwrite"], monkeypatch) == 0
    assert not (project / "preds" / ".opensam.lock").exists()


LOCK_WORKER = """
import os, sys, time
from pathlib import Path
from opensam.apps.guards import output_lock
from opensam.errors import InputError
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    with output_lock(folder):
        try:  # a second holder at the same time finds this file
            fd = os.open(folder / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            sys.exit(3)
        time.sleep(0.3)
        os.close(fd)
        os.unlink(folder / "inside")
except InputError:
    sys.exit(2)
"""


def test_stale_lock_taken_over_by_several_processes_at_once(tmp_path: Path) -> None:
    """Four processes take over a dead run's lock at the same moment: never two hold it."""
    import socket
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for trial in range(3):
        folder = tmp_path / f"out{trial}"
        folder.mkdir()
        lock = {"pid": dead.pid, "host": socket.gethostname(), "started": 0}
        (folder / ".opensam.lock").write_text(json.dumps(lock))
        start = str(time.time() + 4.0)  # after every worker's imports
        cmd = [sys.executable, "-c", LOCK_WORKER, str(folder), start]
        workers = [subprocess.Popen(cmd, env=env) for _ in range(4)]
        codes = sorted(w.wait(120) for w in workers)
        assert 3 not in codes and codes[0] == 0 and set(codes) <= {0, 2}, codes
        assert not (folder / ".opensam.lock").exists()


def test_photo_names_that_are_not_utf8_are_skipped(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Skipped with a warning and listed in failed.txt with the bad byte escaped (\\xff)."""
    shutil.copy(
        project / "photos" / "p0.png", os.fsdecode(bytes(project / "photos") + b"/q\xff.png")
    )
    assert invoke("cli", [*PREDICT, "--overwrite"], monkeypatch) == 0
    assert csv_ids(project / "preds") == ["p0", "p1"]
    failed = (project / "preds" / "failed.txt").read_text()
    assert "q\\xff.png\tfile name is not valid UTF-8" in failed


def test_special_files_are_never_opened(project: Path) -> None:
    from opensam.apps.photos import list_photos

    os.mkfifo(project / "photos" / "pipe.png")
    (project / "list.txt").write_text("photos/pipe.png\nphotos/p0.png\n")
    for source in (project / "photos", project / "list.txt"):
        assert "pipe.png" not in [p.path.name for p in list_photos(source).photos]
    refused = list_photos(project / "list.txt").refused
    assert refused == [(str(project / "photos" / "pipe.png"), "not a regular file (a FIFO, device or folder)")]  # fmt: skip


def test_two_concurrent_predict_runs(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A (photos/) is held mid-run while run B (photos2/) goes into the same folder: B
    either completes and both runs' rows survive, or stops with one line (the lock). Either
    way every label file has its CSV row, and no temporary or lock is left."""
    import threading

    from opensam.apps import predict

    (project / "photos2").mkdir()
    for i in range(3):
        Image.fromarray(scene(70 + i)[0]).save(project / "photos2" / f"q{i}.png")
    shutil.rmtree(project / "preds")
    entered, gate, codes = threading.Event(), threading.Event(), []
    real = predict._Run.predict_chunk

    def held(self: object, model: object, photos: object) -> object:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            gate.wait(120)
        return real(self, model, photos)  # type: ignore[arg-type]

    monkeypatch.setattr(predict._Run, "predict_chunk", held)
    run_a = threading.Thread(target=lambda: codes.append(cli_main(PREDICT)))
    run_a.start()
    assert entered.wait(120)
    code_b = cli_main(["predict", "photos2", *PREDICT[2:]])
    gate.set()
    run_a.join(120)
    assert codes == [0] and code_b in (0, 2)
    rows = set(csv_ids(project / "preds"))
    assert {"p0", "p1"} <= rows
    if code_b == 0:
        assert {"q0", "q1", "q2"} <= rows
    assert {p.stem for p in (project / "preds" / "labels").glob("*.png")} == rows
    assert not list((project / "preds").rglob("*.tmp")) and not (project / "preds" / ".opensam.lock").exists()  # fmt: skip


def test_ids_with_spaces_import_and_round_trip(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    raw = project / "raw"
    for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        shutil.move(raw / folder / f"img00{ext}", raw / folder / f"my photo{ext}")
    lst = raw / "ImageSets" / "Segmentation" / "default.txt"
    lst.write_text(lst.read_text().replace("img00\n", "my photo\n"))
    assert invoke("prepare", PREPARE, monkeypatch) == 0
    splits = json.loads((project / "data" / "prepared" / "splits.json").read_text())
    assert "my photo" in splits["train"] + splits["val"] + splits["test"]
    from opensam.config import ClassSpec
    from opensam.data.importers import open_export

    label = scene(0)[1]
    write_cvat_export(project / "again", NAMES, COLOURS, [("my photo", scene(0)[0], label)])
    export = open_export(project / "again", "cvat", [ClassSpec(n, n) for n in NAMES])
    assert [it.id for it in export.items] == ["my photo"]
    np.testing.assert_array_equal(export.read_label(export.items[0]), label)


def test_export_overwrite_replaces_only_its_own_export(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    assert invoke("cli", [*EXPORT, "--out", "review"], monkeypatch) == 0
    assert invoke("cli", [*EXPORT, "--out", "review"], monkeypatch) == 2
    assert invoke("cli", [*EXPORT, "--out", "review", "--overwrite"], monkeypatch) == 0
    assert invoke("cli", [*EXPORT, "--out", "review.zip"], monkeypatch) == 0
    assert invoke("cli", [*EXPORT, "--out", "review.zip", "--overwrite"], monkeypatch) == 0
    assert zipfile.is_zipfile(project / "review.zip")


def test_resume_checkpoint_never_unpickles_code(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    evil_resume(project)
    assert invoke("warmup", WARMUP, monkeypatch) == 0  # warns, starts over
    assert not (project / "pwned").exists()
    assert (project / "models" / "teacher.pt").is_file()


def test_preset_keeps_comments_and_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text)
    with caplog.at_level("INFO"):
        assert cli_main(["preset", "thesis", "--params", str(path)]) == 0
    new = path.read_text()
    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    assert all(c in new for c in comments)
    diff = difflib.ndiff(text.splitlines(), new.splitlines())
    removed = [line for line in diff if line.startswith("- ")]
    changed = [line for line in caplog.text.splitlines() if " -> " in line]
    # at most one line per changed value (flow-style lines hold several): nothing re-laid out
    assert 0 < len(removed) <= len(changed), (removed, changed)
    demo = yaml.safe_load(text)  # the thesis values over the demo's, whatever those are now
    assert f"ratio: {demo['ratio']} -> 4" in caplog.text
    assert f"warmup.epochs: {demo['warmup']['epochs']} -> 30" in caplog.text
