#!/usr/bin/env bash
# Install everything the test suite needs, then run it all.
#
# System packages (Debian): redis-server, PostgreSQL, Prometheus (with promtool), nginx,
# Chromium, poppler-utils, and a C++ compiler with cmake (llama-cpp-python, the real inference
# server of the suite, builds llama.cpp from source on its first install: several minutes,
# then pip's wheel cache serves it). They are installed with apt-get when missing (as root,
# or through sudo); on another system install them yourself first. Python packages go into
# ./.venv. Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have redis-server || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || have postgres || missing+=(postgresql)
{ have prometheus && have promtool; } || missing+=(prometheus)
have nginx || missing+=(nginx-light)
have chromium || missing+=(chromium)
have pdftotext || missing+=(poppler-utils)
have g++ || missing+=(g++)
have cmake || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian packages start these services; the tests run their own on free ports.
for service in redis-server prometheus nginx postgresql; do
  (command -v systemctl >/dev/null && systemctl stop "$service" 2>/dev/null) || true
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
python_ok() { .venv/bin/python -c "import llama_cpp.server, gguf, tokenizers" 2>/dev/null; }
python_ok || echo "installing Python packages (llama-cpp-python builds llama.cpp: several minutes)"
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check gateway billing providers economics loadtest bench tests
.venv/bin/ruff format --check gateway billing providers economics loadtest bench tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
