"""The public API (``import opensam``): a checkpoint loaded and an image predicted give the class
map ``opensam predict`` writes; a mask store written by the store writer reads back; importing
the package loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, PROMPTS, ROOT, SIZE, region_masks, write_params
from PIL import Image

import opensam
from opensam.apps.cli import main as cli_main
from opensam.apps.predict import LABELS_DIR, infer_batch
from opensam.config import ClipParams
from opensam.errors import InputError
from opensam.images import resize_image, resize_label
from opensam.masks.store import MaskStoreWriter
from opensam.model.segmenter import build_model, save_checkpoint

TRAINED = {"generator": "superpixels", "pps": 4, "min_region_area": 0, "image_size": SIZE}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights checkpoint trained (it says) on superpixels at pps 4, a params.yaml
    saying pps 16, and photos: an EXIF-rotated JPEG, an RGB PNG, an RGBA PNG."""
    root = tmp_path_factory.mktemp("api")
    model = build_model(ClipParams(pretrained=None), PROMPTS)
    save_checkpoint(
        root / "student.pt", model, CLASSES, ClipParams(pretrained=None), SIZE, masks=TRAINED
    )
    write_params(root / "params.yaml", pps=16)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise: the labels come at (W, H) of the stored image
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), np.uint8)).save(
        photos / "rotated.jpg", exif=exif, quality=95
    )
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), np.uint8)).save(photos / "rgb.png")
    rgba = rng.integers(0, 255, (40, 50, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(photos / "rgba.png")
    return root


def test_predict_image_gives_the_class_maps_of_opensam_predict(project: Path) -> None:
    """Same checkpoint, same photos: the API's class maps equal the files the command writes
    (original size, EXIF orientation, the masks recorded in the checkpoint over params.yaml)."""
    ckpt, params, out = project / "student.pt", project / "params.yaml", project / "out"
    argv = ["predict", str(project / "photos"), "--out", str(out)]
    assert cli_main([*argv, "--checkpoint", str(ckpt), "--params", str(params)]) == 0
    predictor = opensam.load_model(ckpt, params=params)
    assert predictor.classes == CLASSES and predictor.image_size == SIZE
    assert predictor.mask_choice.generator == "superpixels" and predictor.mask_choice.pps == 4
    assert predictor.masks is not None
    expected_hw = {"rotated": (80, 48), "rgb": (90, 70), "rgba": (40, 50)}
    kinds = set()
    for image_id, hw in expected_hw.items():
        with Image.open(out / LABELS_DIR / f"{image_id}.png") as img:
            written = np.asarray(img)
        path = next((project / "photos").glob(f"{image_id}.*"))
        labels = opensam.predict_image(predictor, path)
        assert labels.dtype == np.uint8 and labels.shape == hw
        np.testing.assert_array_equal(labels, written)
        kinds |= set(np.unique(labels).tolist())
    assert len(kinds) > 1, "a constant class map would make the comparison above weak"


def test_pil_images_and_arrays_predict_as_their_file(project: Path) -> None:
    predictor = opensam.load_model(project / "student.pt")
    for name in ("rgb.png", "rgba.png"):  # RGBA: composited on white, as photo files are
        path = project / "photos" / name
        from_path = opensam.predict_image(predictor, str(path))
        with Image.open(path) as img:
            np.testing.assert_array_equal(opensam.predict_image(predictor, img), from_path)
            array = np.asarray(img)
        np.testing.assert_array_equal(opensam.predict_image(predictor, array), from_path)
    with pytest.raises(InputError, match="cannot use a"):
        opensam.predict_image(predictor, np.zeros((4, 4, 7), np.uint8))


def test_without_masks_the_prediction_is_per_pixel(project: Path) -> None:
    """``masks="none"``: the model's per-pixel argmax, nearest-upscaled; with the checkpoint's
    superpixels the same photo gives another map (the masks are really used)."""
    plain = opensam.load_model(project / "student.pt", masks="none")
    assert plain.masks is None
    image = np.asarray(Image.open(project / "photos" / "rgb.png"))
    labels, _ = infer_batch(plain.model, [(resize_image(image, SIZE), None)], None)
    expected = resize_label(labels[0], image.shape[:2])
    np.testing.assert_array_equal(opensam.predict_image(plain, image), expected)
    masked = opensam.predict_image(opensam.load_model(project / "student.pt"), image)
    assert (masked != expected).any()


def test_load_model_checks_the_classes_of_params(project: Path, tmp_path: Path) -> None:
    classes = [{"name": "a", "prompt": "a"}, {"name": "b", "prompt": "b"}]
    other = write_params(tmp_path / "params.yaml", classes=classes)
    with pytest.raises(InputError, match="class"):
        opensam.load_model(project / "student.pt", params=other)


def test_read_mask_store_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    label = np.zeros((16, 16), np.uint8)
    label[:, 8:], label[4:8, 2:6] = 1, 2
    sets = {"a": region_masks(label), "b": region_masks(np.rot90(label).copy())}
    attrs = {"generator": "superpixels", "model": "", "checkpoint_sha256": "", "pps": 4}
    attrs |= {"min_region_area": 0, "image_size": 16}
    with MaskStoreWriter(tmp_path / "masks.h5", attrs, list(sets)) as writer:
        for image_id, ms in sets.items():
            writer.write(image_id, ms)
    store = opensam.read_mask_store(tmp_path / "masks.h5")
    assert store.ids() == ["a", "b"] and store.attrs["pps"] == 4
    for image_id, ms in sets.items():
        read = store.read(image_id)
        np.testing.assert_array_equal(read.masks, ms.masks)
        np.testing.assert_array_equal(read.area, ms.area)
    (tmp_path / "not.h5").write_text("text")
    with pytest.raises(InputError, match="not.h5"):
        opensam.read_mask_store(tmp_path / "not.h5")


def test_import_opensam_is_light_and_lazy() -> None:
    """``import opensam`` (which every stage runs first) imports no torch; the API names load on
    first use; unknown names raise AttributeError; ``__all__`` lists what exists."""
    code = (
        "import sys, opensam; assert 'torch' not in sys.modules, 'torch imported';"
        "opensam.load_model; assert 'torch' in sys.modules;"
        "assert all(hasattr(opensam, n) for n in opensam.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with pytest.raises(AttributeError, match="no_such"):
        opensam.no_such  # noqa: B018
