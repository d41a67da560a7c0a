"""Run ``distill.train`` counting, inside the training loop, the calls that make the host wait
for the device on a GPU: reads of a tensor's values (``item``, ``tolist``, ``cpu``, ``numpy``,
``bool``/``int``/``float`` of a tensor, ``torch.equal``) and blocking copies to a device (``to``
with a device and without ``non_blocking=True``, ``new_tensor`` from host data). On the CPU none
of them waits, but each is a wait on a GPU; the loss flush every run.log_every_steps is expected
and not counted, nor is the DataLoader's own host-side work (its tensors never leave the host).
``COUNT_WAITS_TRACE=1`` prints where each counted call comes from. Prints ``waits: <json>``
({name: count, "steps": micro-steps}) at exit.

Usage: ``python tests/count_waits.py RECIPE [overrides]``.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero"}
counts: collections.Counter[str] = collections.Counter()
active = [False]


class CountWaits(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if active[0] and os.environ.get("COUNT_WAITS_TRACE") and (name in READS or name in ("to", "new_tensor")):
            frames = [f for f in traceback.extract_stack()[:-1] if "count_waits" not in f.filename]
            print(
                "TRACE",
                name,
                kwargs,
                [a for a in args[1:2] if not isinstance(a, torch.Tensor)],
                f"{frames[-1].filename}:{frames[-1].lineno}",
                file=sys.stderr,
            )
        if active[0] and not _in_loader():
            if name in READS:
                counts[name] += 1
            elif name == "to" and not kwargs.get("non_blocking", False) and _names_device(args[1:], kwargs):
                counts["to(device) blocking"] += 1
            elif name == "new_tensor":
                counts["new_tensor"] += 1
        return func(*args, **kwargs)


def _in_loader() -> bool:
    """Inside the DataLoader's own host-side work (sampling, StoredImages.__getitems__): host
    tensors only, nothing waits for the device there."""
    return any("torch/utils/data/" in f.filename for f in traceback.extract_stack())


def _names_device(args: Any, kwargs: dict) -> bool:
    if isinstance(kwargs.get("device"), (str, torch.device)):
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[:1]) and not (len(args) > 1 and args[1] is True)


def install() -> None:
    import distill.training.engine as engine
    import distill.training.trainer as trainer
    from distill.training.step import Step

    real_epoch, real_flush, real_step = engine.train_one_epoch, engine.LossMeter.flush, Step.__call__

    def train_one_epoch(*args: Any, **kwargs: Any) -> Any:
        active[0] = True
        try:
            with CountWaits():
                return real_epoch(*args, **kwargs)
        finally:
            active[0] = False

    def flush(self: Any, accelerator: Any) -> Any:
        before, active[0] = active[0], False
        try:
            return real_flush(self, accelerator)
        finally:
            active[0] = before

    def step(self: Any, *args: Any) -> Any:
        counts["steps"] += active[0]
        return real_step(self, *args)

    trainer.train_one_epoch = train_one_epoch
    engine.LossMeter.flush = flush
    Step.__call__ = step  # type: ignore[method-assign]
    atexit.register(lambda: print("waits: " + json.dumps(dict(counts), sort_keys=True), flush=True))


if __name__ == "__main__":
    install()
    from distill.train import main

    sys.exit(main(sys.argv[1:]))
