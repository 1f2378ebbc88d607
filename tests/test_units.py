"""The unit types are a checked contract: mypy rejects level pixels where level-0 pixels go."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api as mypy_api

from histotile.slide import level0_to_level, level_to_level0
from histotile.units import Level0Px, LevelPx, MicronsPerPixel

REPO = Path(__file__).resolve().parents[1]


def _mypy(tmp_path: Path, source: str) -> tuple[str, int]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(source))
    out, err, status = mypy_api.run([
        str(snippet), "--config-file", "", "--follow-imports", "silent",
        "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "--show-error-codes",
    ])
    return out + err, status


def test_units_are_identity_at_run_time():
    assert Level0Px(5) == 5 and type(Level0Px(5)) is int
    assert LevelPx(3) == 3 and MicronsPerPixel(0.25) == 0.25
    assert level_to_level0(LevelPx(3), 4.0) == 12
    assert level0_to_level(Level0Px(12), 4.0) == 3


def test_units_mypy_rejects_level_px_where_level0_px_is_expected(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # mypy finds histotile (and its py.typed) from the repository root
    out, status = _mypy(tmp_path, """\
        from histotile.slide import level0_to_level, level_to_level0
        from histotile.units import Level0Px, LevelPx, MicronsPerPixel

        def place(x: Level0Px) -> Level0Px:
            return x

        level = LevelPx(3)
        ok: Level0Px = level_to_level0(level, 4.0)   # the conversion says what it returns
        back: LevelPx = level0_to_level(ok, 4.0)
        place(ok)
        place(level)                                 # line 11: level px where level-0 px go
        level_to_level0(ok, 4.0)                     # line 12: already level-0
        mpp: MicronsPerPixel = MicronsPerPixel(0.5)
        place(mpp)                                   # line 14: microns are no pixels
        """)
    assert status == 1, out
    lines = sorted(int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line)
    assert lines == [11, 12, 14], out
    assert '"place" has incompatible type "LevelPx"; expected "Level0Px"' in out
