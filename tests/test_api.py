"""The package-level API: cheap import, and entry points callable whatever the import order."""

from __future__ import annotations

import subprocess
import sys


def test_entry_points_callable_after_submodule_import() -> None:
    code = (
        "import histotile.tiling, histotile.inference, histotile.training.api, histotile\n"
        "import inspect\n"
        "assert callable(histotile.tile) and callable(histotile.predict)\n"
        "assert callable(histotile.train) and callable(histotile.evaluate)\n"
        "assert histotile.train is histotile.training.api.train\n"
        "assert inspect.isfunction(histotile.train) and inspect.isfunction(histotile.evaluate)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_issue16_train_is_a_plain_function_not_a_callable_package() -> None:
    code = (
        "import inspect, histotile, histotile.training\n"
        "assert inspect.isfunction(histotile.train), type(histotile.train)\n"
        "assert inspect.ismodule(histotile.training) and not callable(histotile.training)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_issue16_predict_is_a_plain_function() -> None:
    """``histotile.predict`` is the function itself (no callable-module trick): importing the
    package that holds it cannot shadow it."""
    code = (
        "import types, histotile.inference, histotile.cli.predict, histotile\n"
        "assert isinstance(histotile.predict, types.FunctionType), type(histotile.predict)\n"
        "assert histotile.predict is histotile.inference.predict\n"
        "import inspect\n"
        "params = inspect.signature(histotile.predict).parameters\n"
        "assert list(params)[:3] == ['inputs', 'out_dir', 'options'], list(params)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


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
