#!/usr/bin/env sh
# Install Debian's chromium for the report's browser test (tests/e2e/test_report_browser.py).
# Idempotent: does nothing when a Chromium is already on PATH (or $CHROMIUM names one).
# Needs root (or sudo) and the distribution's package mirror; nothing else is downloaded.
set -eu
for b in "${CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$b" ] && command -v "$b" >/dev/null 2>&1; then
    echo "chromium: $(command -v "$b")"
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "chromium is missing and this is not root: install the 'chromium' package" >&2; exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium is missing and there is no apt-get: install Chromium and set CHROMIUM=/path/to/it" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium; }
echo "chromium: $(command -v chromium)"
