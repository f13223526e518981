"""Hard predictions from a (B, C, H, W) score map: ``Tensor.argmax(dim=1)`` (the baseline)
against ours, :func:`opensam.model.aggregation.class_ids` (``Tensor.max(dim=1).indices``).

    .venv/bin/python bench/class_ids.py [--batch 15] [--size 256] [--classes 4] [--repeats 9]

The default is one evaluate batch of the demo (15 log-probability maps of 4 classes at 256²,
fp32, on the CPU, default threads). Both give the same indices (checked here, ties included);
the two are timed round-robin so they share the machine's load alike. The last line is
``class_ids speedup: N.NNx`` (argmax time / ours).
"""

from __future__ import annotations

import argparse

import torch
from aggregate import time_paths  # bench/ is on sys.path when run as a script

from opensam.model.aggregation import class_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=15)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.classes, args.size, args.size)
    scores = torch.randn(shape, generator=gen).log_softmax(dim=1)
    ties = torch.randint(0, 3, shape, generator=gen).float()
    for x in (scores, ties):
        if not torch.equal(class_ids(x), x.argmax(dim=1)):
            raise SystemExit("class_ids and argmax disagree")
    ms = time_paths(
        {"argmax": lambda: scores.argmax(dim=1), "ours": lambda: class_ids(scores)}, args.repeats
    )
    print(f"scores {tuple(shape)} fp32, {torch.get_num_threads()} threads; same indices")
    print(f"baseline Tensor.argmax(dim=1): {ms['argmax']:.2f} ms")
    print(f"ours class_ids (max(dim=1).indices): {ms['ours']:.2f} ms")
    print(f"class_ids speedup: {ms['argmax'] / ms['ours']:.2f}x")


if __name__ == "__main__":
    main()
