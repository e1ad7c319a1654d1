#!/usr/bin/env bash
# Set up a virtual environment with syncfed on a fresh machine.
#
#   bash scripts/setup.sh             torch, syncfed and every extra the tests use (what .ci/run runs), and
#                                     Debian's chromium and chromium-driver for the dashboard's browser test
#                                     when they are missing (apt-get, with sudo when not root)
#   bash scripts/setup.sh --runtime   torch and syncfed's runtime dependencies only: enough to run
#                                     workers and the coordinator, not the tests, --dp or plots
#   bash scripts/setup.sh --dry-run   print the steps without running them (with either of the above)
#
# The CPU build of torch goes in first: a bare "torch" requirement would
# otherwise pull several GB of CUDA packages. Override with TORCH_SPEC, the
# Python with PYTHON, and the environment's folder (.venv) with VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
TARGET=".[test]"
WHAT="syncfed and every extra the tests use (pytest, mypy, ruff, opacus, onnx, dp-accounting, tensorboard, matplotlib, Jupyter's kernel...)"
RUN=
for arg in "$@"; do
    case "$arg" in
        --runtime)
            TARGET="."
            WHAT="syncfed and its runtime dependencies only (no test tools, no extras: add one with $VENV/bin/pip install -e '.[privacy]')"
            ;;
        --dry-run) RUN=echo ;;
        -h | --help)
            sed -n '2,13s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "setup.sh: unknown option $arg (use --runtime, --dry-run or --help)" >&2
            exit 2
            ;;
    esac
done
echo "setup.sh: into $VENV: $TORCH_SPEC (CPU build, unless already there), then $WHAT"
[ -x "$VENV/bin/python" ] || $RUN "$PYTHON" -m venv "$VENV"
$RUN "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>/dev/null || true
"$VENV/bin/python" -c "import torch" 2>/dev/null || $RUN "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
$RUN "$VENV/bin/python" -m pip install --quiet -e "$TARGET"
if [ "$TARGET" = ".[test]" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
        echo "setup.sh: then chromium and chromium-driver (Debian's packages) for the dashboard's browser test"
        $RUN $SUDO apt-get update -qq && $RUN $SUDO apt-get install -y -qq chromium chromium-driver
    else
        echo "setup.sh: no apt-get here: install Chromium and its chromedriver for the dashboard's browser test" \
            "(SYNCFED_CHROMIUM and SYNCFED_CHROMEDRIVER name them)" >&2
    fi
fi
[ -n "$RUN" ] || echo "setup.sh: done, $(du -sh "$VENV" | cut -f1) in $VENV"
