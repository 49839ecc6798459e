# Sourced by tools/test and tools/demo: the set-up both need on a fresh machine with only
# Python 3.11 and apt. Nothing here runs on its own.

# apt_install PKG...: install Debian/Ubuntu packages when this user can (root, or sudo without
# a password); otherwise stop with one line saying what to install.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  fi
  if [ "$sudo" = none ] || ! command -v apt-get >/dev/null; then
    echo "$0: install $* first (Debian/Ubuntu: sudo apt-get install $*), then rerun" >&2
    exit 2
  fi
  echo "== installing $* (apt-get)"
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; then
    echo "$0: apt-get could not install $*; install them by hand, then rerun" >&2
    exit 2
  fi
}

# ensure_python EXTRAS MODULES: set PYTHON to an interpreter that imports MODULES (comma
# separated): $PYTHON if set, else the `python` on PATH (an active venv, CI's), else .venv in
# the checkout, made and filled with `pip install -e ".[EXTRAS]"` when it cannot.
ensure_python() {
  local extras="$1" probe="import $2" cand base
  for cand in "${PYTHON:-}" "$(command -v python || true)" "$PWD/.venv/bin/python"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "$probe" >/dev/null 2>&1; then
      use_python "$cand"; return 0
    fi
  done
  if [ -n "${PYTHON:-}" ]; then
    echo "$0: PYTHON=$PYTHON cannot import what this needs; unset it to use .venv" >&2
    exit 2
  fi
  if [ ! -x .venv/bin/python ]; then
    base="$(command -v python3.11 || command -v python3 || true)"
    if [ -z "$base" ] || ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$0: Python 3.11 is needed (Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv)" >&2
      exit 2
    fi
    echo "== making .venv with $("$base" --version)"
    if ! "$base" -m venv .venv 2>/dev/null; then  # Debian ships venv's pip separately
      rm -rf .venv
      apt_install "$(basename "$base")-venv"
      "$base" -m venv .venv
    fi
  fi
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  echo "== installing mask-search into .venv: pip install -e \"$spec\" (minutes, once)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "$spec" -c constraints.txt
  use_python "$PWD/.venv/bin/python"
}

# use_python PATH: PYTHON, with its folder first on PATH (its console scripts: ruff,
# optuna-dashboard), exported for the commands and tests run after.
use_python() {
  PYTHON="$1"
  PATH="$(dirname "$1"):$PATH"
  export PYTHON PATH
}
