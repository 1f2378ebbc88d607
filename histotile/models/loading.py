"""Find a model (zoo name, folder, URL, ``hf://``), check its weights and load them safely.

Weights load from safetensors (plain tensors) or TorchScript (``torch.jit.load``); never through
``torch.load``/pickle, which can run arbitrary code. The weights file's sha256 must equal the
card's before anything is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from histotile.errors import ChecksumError, ModelError
from histotile.models.card import CARD_FILE, ModelCard, load_card
from histotile.models.preprocess import Preprocessing

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LoadedModel:
    """A model ready for inference: ``module`` is in eval mode on its device."""

    card: ModelCard
    module: nn.Module
    folder: Path
    weights_sha256: str

    @property
    def device(self) -> torch.device:
        import torch

        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")


# --------------------------------------------------------------------------- resolving
def resolve_model(spec: str | Path | None) -> Path:
    """Turn a model spec into a local folder holding ``model.json``.

    ``None`` → the bundled default; a bundled name; a folder (or its ``model.json``); an
    ``http(s)://`` URL of a ``.zip``/``.tar.gz`` model folder (append ``#sha256=<hex>`` to
    verify it), downloaded once into the cache; ``hf://org/repo[@revision]`` through
    ``huggingface_hub`` when installed.
    """
    from histotile.models import zoo

    if spec is None or str(spec) == "":
        return zoo.model_path(zoo.DEFAULT_MODEL)
    text = str(spec)
    if text.startswith(("http://", "https://")):
        return _from_url(text)
    if text.startswith("hf://"):
        return _from_hf(text[len("hf://"):])
    path = Path(text).expanduser()
    if path.is_file() and path.name == CARD_FILE:
        return path.parent
    if path.is_dir():
        if not (path / CARD_FILE).is_file():
            raise ModelError("this folder has no model.json",
                             "a model folder holds model.json and its weights file",
                             subject=text)
        return path
    if text in zoo.list_models():
        return zoo.model_path(text)
    raise ModelError(
        "not a bundled model name, a model folder or a URL",
        f"see 'histotile models list' (bundled: {', '.join(zoo.list_models()) or 'none'})",
        subject=text,
    )


def _from_url(url: str) -> Path:
    """The model folder of an archive URL, cached by its pin.

    With ``#sha256=<hex>`` the cache folder is named by that digest, so a different pin never
    reuses another file's download, and the cached archive is checked against the pin on every
    use (a changed or damaged copy is fetched again). Without a pin the cache is keyed by the
    URL and a warning says that nothing verifies the file.
    """
    from histotile.download import cache_dir, download, verify

    parts = urlsplit(url)
    sha256 = None
    if parts.fragment.startswith("sha256="):
        sha256 = parts.fragment[len("sha256="):].strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ModelError(f"the pin {parts.fragment!r} is not a sha256 (64 hex digits)",
                             "append #sha256=<64 hex digits> of the archive", subject=url)
    bare = parts._replace(fragment="").geturl()
    name = Path(parts.path).name or "model.zip"
    if sha256:
        root = cache_dir("models", f"sha256-{sha256}")
    else:
        log.warning("%s: no #sha256=<hex> pin, so nothing verifies this model archive (append "
                    "#sha256=<digest of the archive> to the URL to pin it)", bare)
        root = cache_dir("models", "url-" + hashlib.sha256(bare.encode()).hexdigest()[:16])
    archive, extracted = root / name, root / "model"
    if sha256 and archive.exists():
        try:
            verify(archive, sha256)
        except ChecksumError:
            log.warning("%s: the cached copy differs from its pin; downloading it again", bare)
            archive.unlink()
            shutil.rmtree(extracted, ignore_errors=True)
    if not (archive.exists() and extracted.is_dir() and _find_card_folder(extracted)):
        archive = download(bare, archive, sha256=sha256)
        _extract(archive, extracted)
    folder = _find_card_folder(extracted)
    if folder is None:
        raise ModelError("the downloaded archive holds no model.json",
                         "the URL must point at a .zip or .tar.gz of a model folder", subject=url)
    return folder


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a zip/tar archive into ``dest`` (atomically; members may not escape it)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    target = (tmp / member).resolve()
                    if not target.is_relative_to(tmp.resolve()):
                        raise ModelError(f"unsafe path in archive: {member}", "refusing to unpack",
                                         subject=str(archive))
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        else:
            raise ModelError("not a .zip or .tar.gz archive",
                             "the URL must point at an archived model folder", subject=str(archive))
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot unpack the model archive ({exc})",
                         "delete it from the cache and download again",
                         subject=str(archive)) from None
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def _find_card_folder(root: Path) -> Path | None:
    if (root / CARD_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(CARD_FILE))
    return found[0] if found else None


def _from_hf(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError("hf:// models need the huggingface_hub package",
                         "pip install huggingface_hub, or pass a downloaded model folder",
                         subject=f"hf://{repo}") from None
    repo_id, _, revision = repo.partition("@")
    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision or None))
    except Exception as exc:  # noqa: BLE001 - network/auth/not-found all mean "cannot get it"
        raise ModelError(f"cannot fetch from the Hugging Face Hub ({type(exc).__name__}: {exc})",
                         "check the repo name and the network", subject=f"hf://{repo}") from None
    return resolve_model(folder)


# --------------------------------------------------------------------------- loading
def resolve_device(device: str | Any = "cpu") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r} ({exc})",
                         "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but is not available", "use --device cpu or auto")
    return dev


def weights_file(card: ModelCard, folder: Path) -> Path:
    """The card's weights file inside ``folder`` (it may not point outside the folder)."""
    rel = card.weights.file
    path = (folder / rel).resolve()
    if not rel or not path.is_relative_to(folder.resolve()):
        raise ModelError(f"weights file {rel!r} is not inside the model folder",
                         "weights.file must name a file in the model folder", subject=str(folder))
    if not path.is_file():
        raise ModelError(f"weights file {rel} is missing",
                         "copy the whole model folder (model.json and its weights)",
                         subject=str(folder))
    return path


def load_model(spec: str | Path | None = None, device: str | Any = "cpu") -> LoadedModel:
    """Resolve ``spec``, verify the weights' sha256 against the card and load them (eval mode)."""
    from histotile.download import file_digest

    folder = resolve_model(spec)
    card = load_card(folder)
    path = weights_file(card, folder)
    digest = file_digest(path, "sha256")
    if digest != card.weights.sha256.lower():
        raise ChecksumError(
            f"weights sha256 {digest[:12]}… differs from the card's {card.weights.sha256[:12]}…",
            "the weights file is corrupt or belongs to another model; copy the model folder again",
            subject=str(path),
        )
    dev = resolve_device(device)
    if card.weights.resolved_format == "torchscript":
        module = _load_torchscript(path, dev)
    else:
        module = _load_safetensors(card, path, dev)
    module.eval()
    return LoadedModel(card=card, module=module, folder=folder, weights_sha256=digest)


def _load_safetensors(card: ModelCard, path: Path, device: torch.device) -> nn.Module:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from histotile.models.architectures import build_model

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"not a readable safetensors file ({exc})",
                         "the weights file is corrupt or in another format",
                         subject=str(path)) from None
    arch = card.architecture
    module = build_model(arch.name, card.num_classes, card.patch_size, **arch.kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"weights do not fit architecture {arch.name!r} with "
                         f"{card.num_classes} classes: {detail}",
                         "the card's architecture, kwargs or classes differ from the training run",
                         subject=str(path)) from None
    return module.to(device=device).to(memory_format=torch.channels_last)


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch >= 2.14 calls jit.load deprecated on every load;
            warnings.filterwarnings("ignore", ".*torch.jit.load.*", FutureWarning)  # not ours
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"not a readable TorchScript file ({' '.join(str(exc).split())[:200]})",
                         "the weights file is corrupt or in another format",
                         subject=str(path)) from None


# --------------------------------------------------------------------------- inputs
def preprocess(batch: Any, card: ModelCard, device: str | Any = None,
               check_size: bool = True) -> torch.Tensor:
    """uint8 NHWC patches → the model's input tensor on ``device`` (no stain step): the card's
    :class:`histotile.models.preprocess.Preprocessing`."""
    return Preprocessing.from_card(card, "none").to_tensor(batch, device, check_size,
                                                           subject=card.name)
