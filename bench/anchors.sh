#!/usr/bin/env bash
# Install the anchor tools (WSInfer, TIAToolbox) into their own virtualenvs and check they run.
#
#   bash bench/anchors.sh install   # create bench/.venvs/{wsinfer,tiatoolbox} (many minutes, GBs)
#   bash bench/anchors.sh check     # run each anchor once on a small benchmark slide
#   bash bench/anchors.sh env       # print the environment WSInfer needs (offline registry)
#
# WSInfer 0.6.1 runs on this machine's torch (venv with --system-site-packages) but needs zarr<3.
# TIAToolbox 2.x pins torch<2.13, so its venv is isolated and pip downloads torch 2.12.x (several GB).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="${BENCH_VENVS:-$HERE/.venvs}"
PY="${PYTHON:-python3.11}"
WSINFER_VERSION="${WSINFER_VERSION:-0.6.1}"
TIATOOLBOX_VERSION="${TIATOOLBOX_VERSION:-2.1.3}"

wsinfer_home() {
  # WSInfer fetches its model-zoo registry from the Hugging Face hub at import; offline it retries for
  # ~25 s and fails. A private HOME with an empty registry and HF_HUB_OFFLINE=1 avoids that.
  local home="$VENVS/wsinfer-home"
  mkdir -p "$home/.wsinfer-zoo"
  [ -f "$home/.wsinfer-zoo/wsinfer-zoo-registry.json" ] ||
    echo '{"models": {}}' > "$home/.wsinfer-zoo/wsinfer-zoo-registry.json"
  echo "$home"
}

install_wsinfer() {
  local v="$VENVS/wsinfer"
  [ -x "$v/bin/python" ] || "$PY" -m venv --system-site-packages "$v"
  "$v/bin/python" -m pip install -q "wsinfer==$WSINFER_VERSION" "zarr<3"
  HOME="$(wsinfer_home)" HF_HUB_OFFLINE=1 "$v/bin/wsinfer" --version
}

install_tiatoolbox() {
  local v="$VENVS/tiatoolbox"
  [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
  "$v/bin/python" -m pip install -q --upgrade pip
  "$v/bin/python" -m pip install -q "tiatoolbox==$TIATOOLBOX_VERSION" psutil
  "$v/bin/python" -c "import tiatoolbox, torch; print('tiatoolbox', tiatoolbox.__version__, 'torch', torch.__version__)"
}

check() {
  local out="$HERE/out/check"
  mkdir -p "$out"
  python "$HERE/make_slide.py" "$out/check.tif" --size 4096 --seed 1
  python "$HERE/export_model.py" "$out/model"
  python "$HERE/run.py" --slide "$out/check.tif" --model-dir "$out/model" --runs 1 \
    --out "$out/run" --tools histotile,wsinfer,tiatoolbox --no-model-alone
}

case "${1:-}" in
  install)
    mkdir -p "$VENVS"
    case "${2:-all}" in
      wsinfer) install_wsinfer ;;
      tiatoolbox) install_tiatoolbox ;;
      all) install_wsinfer; install_tiatoolbox ;;
      *) echo "usage: $0 install [wsinfer|tiatoolbox|all]" >&2; exit 2 ;;
    esac ;;
  check) check ;;
  env) echo "HOME=$(wsinfer_home) HF_HUB_OFFLINE=1" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
