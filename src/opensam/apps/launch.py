"""Run a stage in ``nproc`` processes: ``python -m opensam.apps.launch --nproc N SCRIPT ...``.

``N`` = 1 runs the script in this process, exactly as ``python SCRIPT ...`` would. ``N`` > 1 execs
``torchrun --standalone --nproc_per_node N SCRIPT ...`` (PyTorch's launcher: rank environment,
rendezvous, and it stops every rank when one fails). For several machines set
``OPENSAM_TORCHRUN_ARGS`` to torchrun's multi-node options, which replace ``--standalone``, e.g.
``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29500 --rdzv-id job7`` (README: Scaling out);
then torchrun runs even with ``N`` = 1.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shlex
import sys

from opensam.errors import InputError
from opensam.runtime import run_main

MULTI_NODE_ENV = "OPENSAM_TORCHRUN_ARGS"
DEFAULT_PARAMS = "params.yaml"  # what a stage reads without --params


def torchrun_command(nproc: int, script: str, args: list[str], extra: str = "") -> list[str]:
    """The torchrun command line (``python -m torch.distributed.run ...``) for one stage."""
    rendezvous = shlex.split(extra) if extra.strip() else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        "--nproc_per_node",
        str(nproc),
        script,
        *args,
    ]


def check_params_before_spawning(args: list[str]) -> None:
    """Validate the stage's params file (its ``--params`` argument, else ``params.yaml`` when
    present) once, here: N ranks would each print the same error, and torchrun would add its own
    ChildFailedError traceback and exit 1."""
    from opensam.config import load_params

    path = DEFAULT_PARAMS
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--params="):
            path = arg.split("=", 1)[1]
    if path != DEFAULT_PARAMS or os.path.exists(path):
        load_params(path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m opensam.apps.launch", description=__doc__)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this node")
    parser.add_argument("script", help="the stage script, e.g. stages/warmup.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Launch; returns only for N = 1 (the script's exit code), else execs torchrun."""
    ns = parse_args(argv)
    if ns.nproc < 1:
        raise InputError(f"--nproc: must be >= 1, got {ns.nproc}")
    extra = os.environ.get(MULTI_NODE_ENV, "")
    if not os.path.isfile(ns.script):
        raise InputError(f"{ns.script}: script not found")
    if ns.nproc == 1 and not extra.strip():
        sys.argv = [ns.script, *ns.args]
        try:
            runpy.run_path(ns.script, run_name="__main__")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0
    check_params_before_spawning(list(ns.args))
    cmd = torchrun_command(ns.nproc, ns.script, list(ns.args), extra)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 1  # pragma: no cover (execv does not return)


if __name__ == "__main__":
    run_main(lambda _: main(sys.argv[1:]))
