#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its WebDriver for the browser tests (tests/test_serve_browser.py)
# when /usr/bin/chromium is missing: quietly, without questions. Browser builds cannot be downloaded by the test
# tools here (the network is closed), so the system package is the browser the tests drive.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser.sh: not root and no sudo: install the Debian packages chromium and chromium-driver" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } \
        >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install_browser.sh: apt-get could not install chromium chromium-driver" >&2
    exit 1
fi
echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
