"""End to end through DVC: which stages `dvc exp run -S ...` reruns, on its own tiny project
(tests/pipeline_project.py), so that it runs beside tests/test_pipeline.py under xdist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_project import BIN, build_project, declared_reruns, reset, run, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(tmp_path_factory.mktemp("proj"))


RERUNS = {
    "pps=32": {"masks", "warmup", "pseudolabel", "student", "control", "evaluate"},
    "ratio=3": {"pseudolabel", "student", "evaluate"},
    "student.alpha_f=0.5": {"student", "evaluate"},
    "student.mode=offline": {"student", "control", "evaluate"},  # the default is online
    "student.unsup_weight=0.5": {"student", "evaluate"},
    "seed=1": {"zeroshot", "warmup", "pseudolabel", "student", "control", "evaluate"},
}
# Really run through `dvc exp run`: the README's own example, and the one mode switch that
# changes which training loop the student and control stages run. Their real rerun sets must
# equal what the graph declares, so the declared check below stands for the others (ratio=3
# runs for real in tests/test_pipeline.py's sweep). Each real run costs ~10 s a stage.
REAL = ("pps=32", "student.mode=offline")


@pytest.mark.parametrize("setting", REAL)
def test_exp_run_reruns_only_dependent_stages(project: Path, setting: str) -> None:
    reset(project)
    assert declared_reruns(project, setting) == RERUNS[setting]
    out = run(project, str(BIN / "dvc"), "exp", "run", "-S", setting)
    assert stages_run(out) == RERUNS[setting], out[-3000:]


@pytest.mark.parametrize("setting", sorted(set(RERUNS) - set(REAL)))
def test_each_param_invalidates_only_dependent_stages(project: Path, setting: str) -> None:
    reset(project)
    assert declared_reruns(project, setting) == RERUNS[setting]
