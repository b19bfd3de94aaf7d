#!/usr/bin/env bash
# Prints the path of a working Python 3.10 interpreter: PATH first, then pyenv's
# installed versions. Exits 1 with one line on stderr when there is none.
set -u
works() { "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; }
for cand in python3.10 python3 python; do
    p=$(command -v "$cand" 2>/dev/null) || continue
    works "$p" && { echo "$p"; exit 0; }
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for p in "$root"/versions/3.10.*/bin/python3.10; do
    [ -x "$p" ] && works "$p" && { echo "$p"; exit 0; }
done
echo "no Python 3.10 found: install it (e.g. 'pyenv install 3.10' or Debian's python3.10) and run make again" >&2
exit 1
