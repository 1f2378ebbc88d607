"""Per-slide fixed costs of ``predict`` over a folder, with and without the overlap of slides.

Copies the CMU sample slide ``--slides`` times into a folder, loads the model once (one warm-up
slide), then predicts the folder one slide at a time and overlapped (the next slide prepared and
the previous one finished in background threads), in alternation, ``--rounds`` times each.
Prints per run: wall seconds, the model's seconds (``engine.model_s`` summed over the slides),
what is left per slide (wall minus model, over the slides: the per-slide fixed costs on the
critical path) and the mean stage seconds from ``run.json``.

    python bench/bench_overlap.py --model bench/out/model/histotile [--slides 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("open", "tissue", "stain", "stitch", "export")


def source_slide() -> Path:
    env = os.environ.get("HISTOTILE_BENCH_SOURCE")
    return Path(env) if env else ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def one_run(folder: Path, out: Path, model: str, batch_size: int, overlapped: bool
            ) -> dict[str, Any]:
    """Predict ``folder`` into ``out`` (removed first); wall, model and per-slide seconds."""
    import histotile.batch.runner as runner
    from histotile.batch.pipeline import is_staged
    from histotile.inference import predict

    runner.is_staged = is_staged if overlapped else (lambda process: False)
    try:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = predict(folder, out, model=model, batch_size=batch_size, progress=False)
        wall = time.perf_counter() - t0
    finally:
        runner.is_staged = is_staged
    if summary.failed:
        raise SystemExit(summary.table())
    runs = [json.loads(Path(f).read_text()) for f in glob.glob(str(out / "*" / "run.json"))]
    model_s = sum(r["engine"]["model_s"] for r in runs)
    return {"mode": "overlapped" if overlapped else "one at a time", "slides": len(runs),
            "wall_s": round(wall, 3), "model_s": round(model_s, 3),
            "fixed_per_slide_s": round((wall - model_s) / len(runs), 3),
            "stages": {k: round(sum(r["timings"].get(k, 0) for r in runs) / len(runs), 3)
                       for k in STAGES}}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder or name")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [a temporary one]")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    folder = work / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.slides):
        shutil.copy(source_slide(), folder / f"s{i:03d}.svs")
    # warm-up: imports and the model's first load, outside the timed runs
    one_run(folder / "s000.svs", work / "warm-up", args.model, args.batch_size, overlapped=False)
    results = []
    for r in range(args.rounds):
        for overlapped in ((False, True) if r % 2 == 0 else (True, False)):
            res = one_run(folder, work / "out", args.model, args.batch_size, overlapped)
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
