"""The model of a predict run, loaded lazily: the card (cheap JSON) now, the weights when the
first batch is ready; a load failure is remembered so the other items fail fast with it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from histotile.models import loading
from histotile.models.card import ModelCard, load_card
from histotile.models.loading import LoadedModel, resolve_device, resolve_model

log = logging.getLogger(__name__)


class LazyModel:
    """The card now, the weights on first call; a failure is remembered."""

    def __init__(self, spec: str | Path | None, device: str = "auto") -> None:
        self.spec = spec
        self.device_spec = device
        self.folder = resolve_model(spec)
        self.card: ModelCard = load_card(self.folder)
        self._loaded: LoadedModel | None = None
        self._error: BaseException | None = None
        self._device: Any = None
        self.load_s = 0.0

    @property
    def device(self) -> Any:
        """The torch device (imports torch)."""
        if self._device is None:
            self._device = resolve_device(self.device_spec)
        return self._device

    def __call__(self) -> LoadedModel:
        if self._loaded is None:
            if self._error is not None:
                raise self._error
            t0 = time.perf_counter()
            try:
                self._loaded = loading.load_model(self.folder, self.device)
            except BaseException as exc:
                self._error = exc
                raise
            self.load_s = time.perf_counter() - t0
            log.info("loaded model %s on %s in %.2f s", self.card.name, self.device, self.load_s)
        return self._loaded

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def describe(self) -> dict[str, Any]:
        """Model info for run.json (weights sha256 as verified when loaded, else the card's)."""
        sha = self._loaded.weights_sha256 if self._loaded else self.card.weights.sha256
        return {"name": self.card.name, "version": self.card.version,
                "folder": str(self.folder), "weights_sha256": sha,
                "card": self.card.to_dict()}
