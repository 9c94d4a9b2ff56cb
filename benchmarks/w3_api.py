"""W3 through the Python API, without a run directory (no metrics file, no checkpoints).

``roost run`` always keeps a run directory: a metrics line per server step and
checkpoints (``checkpoint_every_s``); this child of ``benchmarks/w3.py`` runs the same preset with
``roost.runner.run(resolve(...))`` and no ``out``, so that the cost of the run directory
can be told apart from the engine's. It imports them as ``roost run`` does
(``roost.cli.imports_without_gc``), so that the two differ by the run directory only.
Prints one JSON line (``final_loss``, ``final accuracy``, and with worker processes the
peak RSS summed over all of them, as ``summary.json`` would have it).

    python benchmarks/w3_api.py model=mlp [runtime=workers workers=2]
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

from roost.cli import imports_without_gc  # noqa: E402

with imports_without_gc():  # as `roost run` imports them
    from roost.config import PRESETS, apply_overrides, resolve
    from roost.runner import run, summarize


def main() -> None:
    cfg = resolve(apply_overrides(PRESETS["w3"](), sys.argv[1:]))
    history = run(cfg)
    summary = summarize(history, time.perf_counter() - _T0)
    out = {
        "final_loss": summary["final_loss"],
        "final_accuracy": summary["final_accuracy"],
        "rounds": summary["rounds"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "peak_rss_mb_total": summary.get("peak_rss_mb_total"),
        "wall_s": summary["wall_s"],
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
