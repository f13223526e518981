"""runtime.device / precision / nproc: the launcher, and the 2-process CPU (gloo) paths.

The slow tests start real torchrun jobs of two processes on tiny projects and compare them with
the one-process run: masks and pseudo-labels byte for byte, training to float tolerance (the
same global batches; only the gradient summation order differs), kill-and-resume exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import load_stage, write_tiny_project
from dist_online_worker import train as train_online_worker
from dist_worker import train

from opensam.apps import launch
from opensam.config import ClipParams, RuntimeParams
from opensam.errors import InputError
from opensam.model.segmenter import build_model, save_checkpoint
from opensam.parallel.context import (
    Runtime,
    current_runtime,
    init_runtime,
    resolve_device,
    resolve_precision,
    set_runtime,
)
from opensam.parallel.sharding import own_batches
from opensam.train.distributed import RankBatchSampler

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_cpu_runtime_defaults() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "fp32"  # never bf16 on the CPU
    rt = Runtime()
    assert rt.is_main and not rt.distributed and rt.amp_dtype is None
    assert not rt.grad_scaler().is_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_bad_device_and_precision_are_one_line_errors() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1", "tpu", "cuda:x"):
        with pytest.raises(InputError, match="runtime.device"):
            resolve_device(name)
    with pytest.raises(InputError, match="runtime.precision"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(InputError, match="runtime.nproc"):
        init_runtime(RuntimeParams(nproc=0))


def test_init_runtime_single_process_sets_current() -> None:
    before = current_runtime()
    try:
        rt = init_runtime(RuntimeParams(device="cpu", precision="fp16"))
        assert current_runtime() is rt and rt.precision == "fp32" and rt.world == 1
    finally:
        set_runtime(before)


def test_launch_one_process_runs_in_place(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    assert launch.main(["--nproc", "1", str(script), "--x", "1"]) == 3
    cmd = launch.torchrun_command(4, "stages/warmup.py", ["--out", "m.pt"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        "stages/warmup.py",
        "--out",
        "m.pt",
    ]
    multi = launch.torchrun_command(2, "s.py", [], "--nnodes 2 --rdzv-endpoint h:29500")
    assert multi[3:7] == ["--nnodes", "2", "--rdzv-endpoint", "h:29500"]


def test_launch_bad_nproc_is_a_one_line_error(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit(0)\n")
    done = subprocess.run(
        [sys.executable, "-m", "opensam.apps.launch", "--nproc", "0", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --nproc: must be >= 1, got 0"]


def test_batches_split_by_whole_batches() -> None:
    ranks = [own_batches(10, 3, Runtime(rank=r, world=2)) for r in range(2)]
    assert ranks == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]
    inner = [[4, 1, 3], [0, 2], [5]]
    shares = [list(RankBatchSampler(inner, r, 2)) for r in range(2)]  # type: ignore[arg-type]
    assert shares == [[[4, 3], [0], [5]], [[1], [2], [-6]]]  # -6: image 5, labels ignored


def torchrun(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TESTS)])}
    env.pop("OPENSAM_TORCHRUN_ARGS", None)
    cmd = [sys.executable, "-m", "opensam.apps.launch", "--nproc", "2", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def store_datasets(path: Path) -> dict[str, bytes]:
    out = {}
    with h5py.File(path, "r") as f:
        for image_id, group in f["images"].items():
            for name, ds in group.items():
                out[f"{image_id}/{name}"] = np.asarray(ds[()]).tobytes()
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    paths = write_tiny_project(root, 5, 3, 2, 7, size=32)
    params = yaml.safe_load(paths["params"].read_text())
    params.update(pps=4)
    params["pseudo"]["batch_size"] = 3
    paths["params"].write_text(yaml.safe_dump(params))
    pseudo = root / "pseudo"
    pseudo.mkdir()
    (pseudo / "labels").symlink_to(paths["prepared"] / "unlabelled_gt")
    return {**paths, "root": root}


@pytest.mark.slow
def test_two_process_masks_equal_one_process(project: dict[str, Path]) -> None:
    masks_stage = load_stage("masks")
    one, two = project["root"] / "masks1.h5", project["root"] / "masks2.h5"
    args = ["--prepared", str(project["prepared"]), "--params", str(project["params"])]
    assert masks_stage.main([*args, "--out", str(one)]) == 0
    done = torchrun("stages/masks.py", *args, "--out", two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_datasets(one) == store_datasets(two)
    assert not list(project["root"].glob(".masks2.h5*"))  # shards merged and removed


@pytest.fixture(scope="module")
def teacher(project: dict[str, Path]) -> Path:
    path = project["root"] / "teacher.pt"
    params = yaml.safe_load(project["params"].read_text())
    torch.manual_seed(0)
    clip = ClipParams(model="opensam-tiny", pretrained=None)
    model = build_model(clip, [c["prompt"] for c in params["classes"]])
    save_checkpoint(path, model, [c["name"] for c in params["classes"]], clip, 32)
    return path


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[Path, bytes]:
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.mark.slow
def test_two_process_pseudo_labels_equal_one_process(
    project: dict[str, Path], teacher: Path
) -> None:
    pseudolabel = load_stage("pseudolabel")
    outs = {}
    for n in (1, 2):
        out, metrics = project["root"] / f"pseudo{n}", project["root"] / f"pseudo{n}.json"
        args = [
            "--prepared",
            project["prepared"],
            "--masks",
            project["masks"],
            "--teacher",
            teacher,
            "--out",
            out,
            "--metrics",
            metrics,
            "--params",
            project["params"],
        ]
        if n == 1:
            assert pseudolabel.main([str(a) for a in args]) == 0
        else:
            done = torchrun("stages/pseudolabel.py", *args)
            assert done.returncode == 0, done.stderr[-3000:]
        outs[n] = (folder_bytes(out), json.loads(metrics.read_text()))
    assert len(outs[1][0]) == 2 * 5 + 1 and outs[1] == outs[2]  # pool: ratio 1 x 5 train


@pytest.mark.slow
def test_two_process_predict_equals_one_process(
    project: dict[str, Path], teacher: Path, tmp_path: Path
) -> None:
    from opensam.apps import cli

    photos = project["prepared"] / "images"
    args = ["--checkpoint", str(teacher), "--params", str(project["params"]), "--batch-size", "3"]
    assert cli.main(["predict", str(photos), "--out", str(tmp_path / "p1"), *args]) == 0
    done = torchrun(
        ROOT / "src/opensam/apps/cli.py", "predict", photos, "--out", tmp_path / "p2", *args
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = folder_bytes(tmp_path / "p1", ("summary.json",)), folder_bytes(tmp_path / "p2")
    assert len(one) == 2 * 17 + 2 and one == {k: v for k, v in two.items() if k in one}
    assert not list(tmp_path.glob("p2.rank*"))


@pytest.mark.slow
def test_two_process_training_matches_one_and_resumes(
    project: dict[str, Path], tmp_path: Path
) -> None:
    one = train(project["root"], tmp_path / "one" / "r.pt")
    full, killed = tmp_path / "full" / "r.pt", tmp_path / "killed" / "r.pt"
    for out in (full, killed):
        out.parent.mkdir()
    done = torchrun(TESTS / "dist_worker.py", project["root"], full)
    assert done.returncode == 0, done.stderr[-3000:]
    dead = torchrun(TESTS / "dist_worker.py", project["root"], killed, "--kill-after", "2")
    assert dead.returncode != 0 and not killed.exists()
    again = torchrun(TESTS / "dist_worker.py", project["root"], killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    two, resumed = (torch.load(p, weights_only=False) for p in (full, killed))  # our own files
    for key in one["state"]:  # same global batches: equal up to float summation order
        torch.testing.assert_close(two["state"][key], one["state"][key], rtol=1e-4, atol=1e-5)
        assert torch.equal(resumed["state"][key], two["state"][key]), key  # resume: exact
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["val/miou"] == pytest.approx(b["val/miou"], abs=1e-6)
    assert np.array_equal(two["confusion"], one["confusion"])
    assert two["seen"] == one["seen"]  # the sink sees the one-process order on rank 0


@pytest.fixture(scope="module")
def online_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_project(tmp_path_factory.mktemp("dist_online"), 4, 2, 2, 6, size=48)


@pytest.mark.slow
def test_two_process_online_loop_syncs_ranks_and_resumes(
    online_project: dict[str, Path], tmp_path: Path
) -> None:
    p = online_project
    inputs = (p["params"], p["prepared"], p["masks"])
    worker = TESTS / "dist_online_worker.py"
    # λ = 0 (the control): the same global batches as one process, so the same weights up to
    # float summation order
    one = train_online_worker(*inputs, tmp_path / "one" / "r.pt", control=True)
    (tmp_path / "two").mkdir()
    done = torchrun(worker, *inputs, tmp_path / "two" / "r.pt", "--control")
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "r.pt", weights_only=True)
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train/loss_labelled"] == pytest.approx(b["train/loss_labelled"], rel=1e-4)
    # λ = 1: the ranks stay identical (averaged gradients), and a kill of both ranks resumes
    full, killed = tmp_path / "full" / "r.pt", tmp_path / "killed" / "r.pt"
    for out in (full, killed):
        out.parent.mkdir()
    done = torchrun(worker, *inputs, full)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{full}.rank{r}", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    student = torch.load(full, weights_only=True)
    assert any(not torch.equal(student["state"][k], two["state"][k]) for k in ranks[0])
    assert 0 < student["history"][-1]["train/confident"] <= 1
    dead = torchrun(worker, *inputs, killed, "--kill-after", "1")
    assert dead.returncode != 0 and not killed.exists()
    again = torchrun(worker, *inputs, killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    resumed = torch.load(killed, weights_only=True)
    for key, value in student["state"].items():
        assert torch.equal(resumed["state"][key], value), key
