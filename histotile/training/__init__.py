"""Training and evaluation: datasets, the fit loop, model cards, metrics and reports.

``histotile.train(...)`` is :func:`histotile.training.api.train` and ``histotile.evaluate(...)``
is :func:`histotile.training.loop.evaluate`: the library calls behind ``histotile train`` and
``histotile evaluate``. The package itself imports nothing, so its submodules load on use.
"""
