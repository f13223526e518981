"""opensam.prepared: reading ``splits.json``, the path helpers, the unlabelled pool of a ratio,
the one class-list check and the one colour rule."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opensam.errors import InputError
from opensam.prepared import (
    Prepared,
    check_classes,
    class_colors,
    read_prepared,
    write_splits,
)

INDEX: dict[str, Any] = {
    "image_size": 32,
    "classes": ["cat", "sky"],
    "colors": [[1, 2, 3], [4, 5, 6]],
    "train": ["t0", "t1", "t2"],
    "val": ["v0"],
    "test": ["s0"],
    "unlabelled": [f"u{i}" for i in range(10)],
    "unlabelled_gt": True,
    "sources": {"t0": "/photos/t0.jpg", "u0": "zip:x.zip!u0.jpg"},
}


def prepared_with(tmp_path: Path, **over: Any) -> Prepared:
    write_splits(tmp_path, {**INDEX, **over})
    return read_prepared(tmp_path)


def test_read_prepared_round_trip_and_paths(tmp_path: Path) -> None:
    p = prepared_with(tmp_path)
    assert (p.image_size, p.classes, p.colors) == (32, ("cat", "sky"), ((1, 2, 3), (4, 5, 6)))
    assert p.train == ("t0", "t1", "t2") and p.has_hidden_gt
    assert p.sources == INDEX["sources"]
    assert p.splits_path == tmp_path / "splits.json"
    assert p.image_path("t0") == tmp_path / "images" / "t0.png"
    assert p.label_path("v0") == tmp_path / "labels" / "v0.png"
    assert p.hidden_gt_dir == tmp_path / "unlabelled_gt"
    assert p.ids("test") == ["s0"] and p.ids("unlabelled") == INDEX["unlabelled"]
    assert p.split_ids() == {"train": ["t0", "t1", "t2"], "val": ["v0"], "test": ["s0"]}
    assert p.split_ids(("val",)) == {"val": ["v0"]}
    with pytest.raises(KeyError):
        p.ids("bogus")


def test_optional_keys_default(tmp_path: Path) -> None:
    (tmp_path / "splits.json").write_text(json.dumps({"image_size": 8}))
    p = read_prepared(tmp_path)
    assert (p.classes, p.colors, p.train, p.unlabelled, p.has_hidden_gt) == ((), (), (), (), False)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "not found (run the prepare stage)"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**INDEX, "image_size": "big"}), "'image_size' must be a positive integer"),
        (json.dumps({**INDEX, "image_size": 0}), "'image_size' must be a positive integer"),
        (json.dumps({**INDEX, "image_size": True}), "'image_size' must be a positive integer"),
        (json.dumps({**INDEX, "classes": "cat"}), "'classes' must be a list of names"),
        (json.dumps({**INDEX, "train": "t0"}), "'train' must be a list of image ids"),
        (json.dumps({**INDEX, "unlabelled": [1]}), "'unlabelled' must be a list of image ids"),
        (json.dumps({**INDEX, "colors": [[1, 2, 3]]}), "'colors' must be one [r, g, b]"),
        (json.dumps({**INDEX, "colors": [[1, 2, 3], [4, 5, 256]]}), "'colors' must be one"),
        (json.dumps({**INDEX, "sources": ["a"]}), "'sources' must be a mapping"),
    ],
)
def test_read_prepared_errors_name_the_file(
    tmp_path: Path, text: str | None, fragment: str
) -> None:
    path = tmp_path / "splits.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as err:
        read_prepared(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_pool_ids_nests_and_clips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = prepared_with(tmp_path)  # 3 train, 10 unlabelled
    one, two = p.pool_ids(1), p.pool_ids(2)
    assert one == INDEX["unlabelled"][:3] and two == INDEX["unlabelled"][:6]
    assert set(one) < set(two)  # a larger ratio's pool contains the smaller one's
    assert p.pool_ids(0) == []
    with caplog.at_level(logging.WARNING, logger="opensam.prepared"):
        assert p.pool_ids(8) == INDEX["unlabelled"]  # fewer than wanted: all of them
    assert "ratio 8 wants 24 unlabelled images, only 10 exist" in caplog.text
    with pytest.raises(ValueError, match="ratio"):
        p.pool_ids(-1)


def test_check_classes_is_one_message(tmp_path: Path) -> None:
    check_classes(["a", "b"], ("a", "b"), "x.json", "params.yaml")  # equal: no error
    with pytest.raises(InputError) as err:
        check_classes(["a", "b"], ["b", "a"], "x.json", "params.yaml classes")
    message = str(err.value)
    assert message.startswith("x.json: classes ['a', 'b'] differ from params.yaml classes")
    assert "['b', 'a']" in message and "same order" in message and "\n" not in message
    p = prepared_with(tmp_path)
    p.check_classes(["cat", "sky"], "teacher.pt")
    with pytest.raises(InputError, match=f"^{p.splits_path}: classes .* differ from teacher.pt"):
        p.check_classes(["cat"], "teacher.pt")


def test_class_colors_params_then_fallback_then_palette() -> None:
    colors = class_colors([(1, 2, 3), None, None], fallback=[[9, 9, 9], [4, 5, 6]])
    np.testing.assert_array_equal(colors[:2], [[1, 2, 3], [4, 5, 6]])  # params win, then labelmap
    assert colors.dtype == np.uint8 and colors.shape == (3, 3)
    assert colors[2].any()  # no colour anywhere: generated, not black
    generated = class_colors([None] * 4)
    assert len({tuple(c) for c in generated}) == 4  # distinct hues
    np.testing.assert_array_equal(generated, class_colors([None] * 4, fallback=[]))  # stable
