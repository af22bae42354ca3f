#!/usr/bin/env bash
# README's test command: bring what the tests need, then lint, type-check and run the whole suite.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/test_sse.py -q    # arguments go to pytest
#
# What it brings: Debian packages (redis-server, chromium, tmux, openssl, systemd's analyzer, a font) with apt-get
# when it runs as root or with password-less sudo; the JavaScript packages from package-lock.json (npm ci);
# a virtual environment in .venv (unless one is active) with the test extra. What it cannot bring, it names
# in one line and stops, before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

# Debian packages, by the command (or file) that shows each is there.
declare -A needs=(
  [redis-server]=redis-server
  [chromium]=chromium
  [tmux]=tmux
  [openssl]=openssl
  [systemd-analyze]=systemd
  [/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf]=fonts-dejavu-core
)
missing=()
for probe in "${!needs[@]}"; do
  if [[ $probe == /* ]]; then [[ -e $probe ]] || missing+=("${needs[$probe]}")
  else command -v "$probe" >/dev/null || missing+=("${needs[$probe]}"); fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]]; then sudo=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n)
  else
    say "missing Debian packages: ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run this as root"
    exit 1
  fi
  command -v apt-get >/dev/null || { say "missing packages: ${missing[*]}, and no apt-get to install them"; exit 1; }
  say "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node.js 20 or newer, for the AI SDK's own transport and the useChat example.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if ((node_major < 20)); then
  say "Node.js 20 or newer is needed (found: $(node --version 2>/dev/null || echo none)); install it, then run this again"
  exit 1
fi
npm ci --no-audit --no-fund --loglevel=error

# Python 3.11 or newer, in a virtual environment.
if [[ -z ${VIRTUAL_ENV:-} ]]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    say "Python 3.11 or newer is needed (found: $(python3 --version 2>&1))"; exit 1; }
  [[ -x .venv/bin/python ]] || python3 -m venv .venv || {
    say "python3 -m venv failed: install Debian's python3-venv (apt-get install python3-venv)"; exit 1; }
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -e ".[test]"

ruff check
mypy
python -m pytest "$@"
