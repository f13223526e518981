"""End to end through DVC: which stages `dvc exp run -S ...` reruns, on its own tiny project
(tests/pipeline_project.py), so that it runs beside tests/test_pipeline.py under xdist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_project import BIN, declared_reruns, reset, run, shared_project, stages_run

pytestmark = [
    pytest.mark.slow,  # DVC's in-process API (declared_reruns) warns through pygtrie, not us
    pytest.mark.filterwarnings("ignore:_NoneStep.value will soon raise:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_project(tmp_path_factory, "proj")


RERUNS = {
    "pps=32": {"masks", "warmup", "pseudolabel", "student", "control", "oracle", "evaluate"},
    "ratio=3": {"pseudolabel", "student", "oracle", "evaluate"},
    "student.alpha_f=0.5": {"student", "oracle", "evaluate"},
    "student.mode=offline": {"student", "control", "oracle", "evaluate"},  # the default: online
    "student.unsup_weight=0.5": {"student", "oracle", "evaluate"},
    "student.perturbation=complementary": {"student", "oracle", "evaluate"},  # not the control
    # a true label is always confident: the oracle does not read the threshold
    "student.conf_threshold=0.5": {"student", "evaluate"},
    "student.lr_max=0.001": {"student", "control", "oracle", "evaluate"},  # the schedule too
    "masks.workers=1": set(),  # processes only: the same masks
    "seed=1": {"zeroshot", "warmup", "pseudolabel", "student", "control", "oracle", "evaluate"},
    # fewer labelled photos: the training stages, never prepare or the masks (val and test fixed)
    "labelled_train=2": {"warmup", "pseudolabel", "student", "control", "oracle", "evaluate"},
}
# Really run through `dvc exp run`: a setting whose rerun set reaches past the stage whose params
# changed (student -> its .pt -> evaluate, which has no student params). Its real rerun set must
# equal what the graph declares, so the declared check below stands for the other settings;
# ratio=3 also runs for real in tests/test_pipeline.py's sweep, and the offline student stage in
# tests/test_student_stage.py. The tiny project counts every unlabelled pixel (threshold 0), so
# the weight λ of the unlabelled loss surely changes the student's weights (and DVC reruns
# evaluate only when the student's bytes change). It reruns three stages (the oracle learns the
# true labels with the same λ), where the learning rate (student, control, oracle) reruns four.
# The README's own example, pps=32 (masks -> warmup -> ...),
# is checked through the graph only: run for real it was the suite's longest test (89 s of 6
# stage runs, mostly imports), and the README's test command must stay under 15 minutes.
REAL = ("student.unsup_weight=0.5",)


def test_demo_world_never_reruns_the_stand_ins(project: Path) -> None:
    """The demo CLIP and SAM learn from their own corpora: another demo world (demo.seed)
    regenerates the photos and everything after them, never the stand-ins."""
    reset(project)
    reruns = declared_reruns(project, "demo.seed=7")
    assert {"demo_data", "prepare", "masks", "warmup", "evaluate"} <= reruns
    assert not {"demo_clip", "demo_sam"} & reruns
    assert {"demo_sam", "masks", "warmup"} <= declared_reruns(project, "demo_sam.steps=4")


@pytest.mark.parametrize("setting", REAL)
def test_exp_run_reruns_only_dependent_stages(project: Path, setting: str) -> None:
    reset(project)
    assert declared_reruns(project, setting) == RERUNS[setting]
    out = run(project, str(BIN / "dvc"), "exp", "run", "-S", setting)
    assert stages_run(out) == RERUNS[setting], out[-3000:]


@pytest.mark.parametrize("setting", sorted(set(RERUNS) - set(REAL)))
def test_each_param_invalidates_only_dependent_stages(project: Path, setting: str) -> None:
    # only the committed params and lock matter (a real run may have applied its own): the changed
    # deps DVC reports are params deps, so the outputs need no `dvc checkout`
    run(project, "git", "checkout", "-q", "--", "params.yaml", "dvc.lock")
    assert declared_reruns(project, setting) == RERUNS[setting]
