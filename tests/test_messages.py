"""Say what happened, once (issue 15; issue 17 item 14): errors and log lines are never glued to
a progress bar nor printed twice, t-SNE shows progress, p-values are rounded, AUC 0 is 0, a tiny
validation set is called out, help text has no doubled %."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

import histotile
from histotile.cli import TqdmLogHandler

ROOT = Path(histotile.__file__).resolve().parents[1]


def _after_last_cr(line: str) -> str:
    """What a terminal shows of a line: the text after its last carriage return."""
    return line.rsplit("\r", 1)[-1]



@pytest.mark.slow  # its own process: ~11 s on 2 cores (the -q case below runs in-process)
def test_issue17_14_failed_slide_said_once_and_not_glued_to_a_bar(cmu_small, tmp_path):
    """A real ``histotile predict`` (its own process, as a user runs it) over a damaged file and
    the sample slide, progress bars on: the failure is printed once, every message line starts
    on a line of its own."""
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(b"junk")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "histotile", "predict", str(bad), str(cmu_small), "-o",
         str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("cannot be read as a slide") == 1, proc.stderr
    messages = [_after_last_cr(line) for line in proc.stderr.split("\n")
                if "INFO:" in line or "error" in line or "failed:" in line]
    assert len(messages) >= 3  # the model-loaded line, the failure, its name in the summary
    for shown in messages:
        assert "%|" not in shown, f"message glued to a progress bar: {shown!r}"
    assert any(m.startswith(f"error: {bad}: cannot be read") for m in messages), messages
    assert "failed: damaged.svs" in messages  # the summary names it, without the message


def test_issue17_14_quiet_failure_said_once(tmp_path, capsys):
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(b"junk")
    code, out, err = run_cli(["-q", "predict", str(bad), "-o", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.count("cannot be read as a slide") == 1, err
    assert err.startswith("error: ") and str(bad) in err


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "bars"])
def test_issue17_14_tile_failure_said_once(cmu_small, tmp_path, capsys, quiet):
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(b"junk")
    args = ["tile", str(bad), str(cmu_small), "-o", str(tmp_path / "out"), "--limit", "4"]
    code, out, err = run_cli(["-q", *args] if quiet else args, capsys)
    assert code == 1
    assert err.count("damaged.svs") >= 1
    said = [_after_last_cr(line) for line in err.split("\n")
            if "junk" in line or "cannot be read" in line]
    assert len(said) == 1 and said[0].startswith(f"error: {bad}"), err
    assert "CMU-1-Small-Region" in out or quiet


def test_issue17_14_log_line_is_not_glued_to_a_running_bar(capsys):
    from tqdm import tqdm

    log = logging.getLogger("histotile.test_messages")
    handler = TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    try:
        with tqdm(total=10, desc="patches", file=sys.stderr) as bar:
            bar.update(3)
            log.warning("slide X: something to say")
            bar.update(7)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    err = capsys.readouterr().err
    shown = [_after_last_cr(line) for line in err.split("\n") if "something to say" in line]
    assert shown == ["WARNING: slide X: something to say"], err


def test_issue15_describe_shows_tsne_progress(capsys):
    from histotile.describe import tsne

    x = np.random.default_rng(0).normal(size=(24, 5))  # GENERATED features
    xy = tsne(x, perplexity=5, progress=True)
    out, err = capsys.readouterr()
    assert xy.shape == (24, 2)
    assert "t-SNE of 24 patches" in err and ("it/s" in err or "s/it" in err)
    assert "[t-SNE]" not in out + err  # scikit-learn's own lines are turned into the bar
    assert "100%" in err


def test_issue15_evaluate_prints_rounded_p_values():
    from histotile.cli.train import evaluation_lines
    from histotile.training.report import format_p_value

    assert format_p_value(0.031234) == "p = 0.031"
    assert format_p_value(0.00002) == "p < 0.001"
    assert format_p_value(1.0) == "p = 1.000"
    assert format_p_value(None) == "p n/a"
    m = {"model": "a", "dataset": "d", "split_source": "test split", "n": 200, "accuracy": 0.87,
         "auc": 0.0, "comparison": {
             "other_model": "b", "accuracy": {"a": 0.87, "b": 0.82, "difference": 0.05},
             "mcnemar": {"test": "McNemar (exact binomial)", "p_value": 0.0312345678},
             "auc": {"b": 0.91, "test": "DeLong", "p_value": 3.2e-7}}}
    text = "\n".join(evaluation_lines(m))
    assert "p = 0.031" in text and "p < 0.001" in text
    assert "0.0312345678" not in text and "3.2e-07" not in text
    assert "auc                0.0000" in text  # 0 is 0, not nan


def test_issue15_train_prints_auc_zero_as_zero_and_warns_on_tiny_validation(
        tmp_path, capsys, caplog, monkeypatch):
    import histotile.training.api

    def fake_train(dataset, out, **kw):  # the CLI's printing, not a training run
        out.mkdir(parents=True)
        (out / "model.json").write_text(json.dumps(
            {"metrics": {"validation": {"accuracy": 0.5, "auc": 0.0, "n": 12}}}))
        (out / "metrics.json").write_text(json.dumps({"validation": {
            "n": 12, "per_class": {"normal": {"support": 10}, "tumor": {"support": 2}}}}))
        return out

    monkeypatch.setattr(histotile.training.api, "train", fake_train)
    with caplog.at_level(logging.WARNING):
        code, out, _ = run_cli(["train", "pcam", "-o", str(tmp_path / "m")], capsys)
    assert code == 0
    assert "AUC 0.0000" in out and "nan" not in out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "12 images" in warned[0] and "tumor 2" in warned[0]


def test_small_validation_warning_thresholds():
    from histotile.training.report import format_metric, small_validation_warning

    big = {"n": 200, "per_class": {"a": {"support": 100}, "b": {"support": 100}}}
    assert small_validation_warning(big) is None
    assert "fewer than 30" in small_validation_warning({"n": 29})
    lopsided = {"n": 200, "per_class": {"a": {"support": 196}, "b": {"support": 4}}}
    assert "b 4" in small_validation_warning(lopsided)
    assert format_metric(0.0) == "0.0000" and format_metric(float("nan")) == "n/a"
    assert format_metric(None) == "n/a"


def test_issue15_slurm_script_help_has_no_doubled_percent(capsys):
    code, out, _ = run_cli(["slurm", "script", "--help"], capsys)
    assert code == 0
    assert "%%" not in out and "--array=0-N%K" in out
