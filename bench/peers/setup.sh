#!/usr/bin/env bash
# Creates the Python virtualenv of the peer benchmarks (Celery, Dramatiq) from PyPI:
#
#   bench/peers/setup.sh        create or update .warren/bench-venv (git-ignored) and print its python
#
# The versions are pinned in bench/peers/requirements.txt. Idempotent: when the venv already holds
# exactly those pins (a stamp of the file's hash and the venv's Python version), it does nothing.
# WARREN_BENCH_PYTHON picks the base interpreter (default python3; it needs the venv module, on
# Debian's own python3 that is the python3-venv package). WARREN_BENCH_VENV moves the venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${WARREN_BENCH_VENV:-$ROOT/.warren/bench-venv}
REQ=$ROOT/bench/peers/requirements.txt
PYTHON=${WARREN_BENCH_PYTHON:-python3}
STAMP=$VENV/.peers-requirements.stamp

stamp_of() { # the venv's python -> "sha256-of-requirements python-version"
    printf '%s %s\n' "$(sha256sum "$REQ" | cut -d' ' -f1)" "$("$1" -c 'import sys; print(sys.version.split()[0])')"
}

if [[ -x $VENV/bin/python && -f $STAMP ]] && [[ $(cat "$STAMP") == "$(stamp_of "$VENV/bin/python")" ]] &&
    "$VENV/bin/python" -c 'import celery, kombu, amqp, dramatiq, pika, psutil, matplotlib' 2>/dev/null; then
    echo "setup: $VENV is up to date" >&2
    echo "$VENV/bin/python"
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: no $PYTHON on PATH (set WARREN_BENCH_PYTHON)" >&2
    exit 1
fi
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
    echo "setup: creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv --clear "$VENV"; then
        echo "setup: '$PYTHON -m venv' failed (Debian's python3 needs: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
echo "setup: installing the pins of $REQ" >&2
"$VENV/bin/python" -m pip install --quiet --no-input --disable-pip-version-check -r "$REQ" >&2
"$VENV/bin/python" -m pip check >&2
stamp_of "$VENV/bin/python" >"$STAMP"
echo "setup: ready: $("$VENV/bin/python" -c 'import celery, dramatiq, pika, kombu, psutil, matplotlib; print("celery", celery.__version__, "kombu", kombu.__version__, "dramatiq", dramatiq.__version__, "pika", pika.__version__, "psutil", psutil.__version__, "matplotlib", matplotlib.__version__)')" >&2
echo "$VENV/bin/python"
