"""End to end through DVC: which stages `dvc exp run -S ...` reruns, on its own tiny project
(tests/pipeline_project.py), so that it runs beside tests/test_pipeline.py under xdist.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_project import BIN, build_project, run, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project(tmp_path_factory.mktemp("proj"))


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("pps=32", {"masks", "warmup", "pseudolabel", "student", "control", "evaluate"}),
        ("ratio=3", {"pseudolabel", "student", "evaluate"}),
        ("student.alpha_f=0.5", {"student", "evaluate"}),
        ("student.mode=offline", {"student", "control", "evaluate"}),  # the default is online
        ("student.unsup_weight=0.5", {"student", "evaluate"}),
        ("seed=1", {"zeroshot", "warmup", "pseudolabel", "student", "control", "evaluate"}),
    ],
)
def test_exp_run_reruns_only_dependent_stages(
    project: Path, setting: str, expected: set[str]
) -> None:
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "git", "clean", "-fdq", "--", "metrics")  # curves an earlier experiment added
    run(project, str(BIN / "dvc"), "checkout", "-q", check=False)
    out = run(project, str(BIN / "dvc"), "exp", "run", "-S", setting)
    assert stages_run(out) == expected, out[-3000:]
