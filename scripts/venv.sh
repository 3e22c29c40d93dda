#!/usr/bin/env bash
# Creates (or reuses) ./.venv with Python >= 3.12 and installs effx with its test extras.
# Usage: source-free; prints nothing but pip's errors. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for c in python3.13 python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -rV); do
      p="$(pyenv root)/versions/$v/bin/python3"
      [ -x "$p" ] && { echo "$p"; return 0; }
    done
  fi
  echo "effx needs Python >= 3.12 (jax >= 0.12 does not support older Pythons); install python3.12" >&2
  return 1
}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
stamp=.venv/.effx-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
