# Sourced by the other scripts: create .venv if missing and install Tessera into it.
# torch is installed first, pinned, so that no dependency can pull a multi-GB CUDA build.
# Usage: source scripts/env.sh [EXTRAS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; assert sys.version_info >= (3, 10), "Tessera needs Python 3.10+"' \
    || { echo "error: Python 3.10 or newer is required (set PYTHON=...)" >&2; exit 2; }
  "$python" -m venv .venv \
    || { echo "error: could not create .venv; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 2; }
fi
stamp=".venv/.tessera-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # DS_BUILD_OPS=0: DeepSpeed (an extra) compiles its ops on first use instead of at install.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
