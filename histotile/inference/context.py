"""What every item of a predict run shares: the options, the lazily loaded model, the model's
preprocessing (resolved once from the card and ``stain_norm``) and the compute plan."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import NoTissueError
from histotile.inference.model import LazyModel
from histotile.inference.provenance import environment
from histotile.models.preprocess import STAIN_SEED, Preprocessing
from histotile.options import PredictOptions

if TYPE_CHECKING:
    from histotile.engine import ComputePlan, StainStep  # imports torch

log = logging.getLogger(__name__)


@dataclass
class PredictContext:
    """One per process: built from the options, reused for every item."""

    options: PredictOptions
    model: LazyModel
    preprocessing: Preprocessing
    compute: ComputePlan | None = None  # set once per process before the first item
    _environment: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_options(cls, options: PredictOptions) -> PredictContext:
        model = LazyModel(options.model, options.device)
        return cls(options, model, Preprocessing.from_card(model.card, options.stain_norm))

    @property
    def card(self) -> Any:
        return self.model.card

    def effective_workers(self) -> int:
        from histotile.engine import default_workers  # engine imports torch

        if self.options.workers is not None:
            return self.options.workers
        return default_workers(self.model.device)

    def environment(self) -> dict[str, Any]:
        """run.json's versions, device, threads and command: the same for every item of the
        process, so found once (after ``compute`` is set: torch's thread count is in it)."""
        if self._environment is None or self.compute is None:
            self._environment = environment(self.model.device, self.options.command)
        return dict(self._environment)

    def compute_info(self) -> dict[str, int] | None:
        plan = self.compute
        return None if plan is None else {"streams": plan.streams, "torch_threads": plan.threads}

    def settings_info(self) -> dict[str, Any]:
        """run.json's ``options`` (as given, after validation) and ``preprocessing`` (resolved)."""
        return {"options": self.options.to_dict(),
                "preprocessing": self.preprocessing.describe()}

    def slide_stain_step(self, sample: np.ndarray | None, subject: str
                         ) -> tuple[StainStep | None, dict[str, Any]]:
        """The stain step of one slide (or None) and its run.json info: the normaliser fitted
        once on ``sample``, a uint8 (k,P,P,3) seeded sample of the slide's tissue patches
        (``None`` when the plan normalises nothing: no patch is read for it)."""
        from histotile.engine import StainStep

        plan = self.preprocessing.stain
        info: dict[str, Any] = plan.describe()
        normalizer = plan.normalizer()
        if normalizer is None:
            return None, info
        try:
            fit = normalizer.fit(sample)
        except NoTissueError as exc:
            log.warning("%s: stain fit failed (%s); predicting without stain normalisation",
                        subject, exc.message)
            return None, {**info, "method": "none", "requested_method": plan.method,
                          "fit_error": exc.message}
        return StainStep(normalizer, fit), {
            **info, "mode": "per slide", "sample_patches": 0 if sample is None else len(sample),
            "seed": STAIN_SEED,
            "fit": {"stain_matrix": fit.stain_matrix.double().cpu().tolist(),
                    "max_concentrations": fit.max_concentrations.double().cpu().tolist(),
                    "n_pixels": int(fit.n_pixels)}}

    def patch_stain_step(self) -> tuple[StainStep | None, dict[str, Any]]:
        """The stain step for archive patches (from many slides): each patch fitted on its own,
        as in training and ``evaluate``."""
        from histotile.engine import StainStep

        normalizer = self.preprocessing.stain.normalizer()
        info = self.preprocessing.stain.describe()
        if normalizer is None:
            return None, info
        return StainStep(normalizer, None), {**info, "mode": "per patch"}
