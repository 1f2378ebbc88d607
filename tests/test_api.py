"""The package-level API: cheap import, and entry points callable whatever the import order."""

from __future__ import annotations

import subprocess
import sys


def test_entry_points_callable_after_submodule_import() -> None:
    code = (
        "import histotile.tiling, histotile.predict, histotile.train, histotile\n"
        "assert callable(histotile.tile) and callable(histotile.predict)\n"
        "assert callable(histotile.train) and callable(histotile.evaluate)\n"
        "assert histotile.train.train is histotile.train.loop.train\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from histotile.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'zarr', 'dask', 'skimage', 'h5py', 'sklearn', 'matplotlib'}\n"
        "loaded = sorted(heavy & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "predict" in out.stdout
