#!/usr/bin/env bash
# Installs what the headless-browser test (tests/browser.rs) needs, when it is
# missing: Debian's Chromium at /usr/bin/chromium and the npm packages of
# tests/browser (playwright-core, which drives the installed Chromium; it never
# downloads a browser of its own). Idempotent; runs as root.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ ! -x /usr/bin/chromium ]; then
    echo "install-browser: installing chromium (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium fonts-liberation
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install-browser: installing nodejs and npm (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends nodejs npm
fi

if [ ! -d "$root/tests/browser/node_modules/playwright-core" ]; then
    echo "install-browser: installing npm packages in tests/browser"
    cd "$root/tests/browser"
    # playwright-core has no install script, but make sure nothing tries to
    # fetch a browser build.
    export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
    if [ -f package-lock.json ]; then
        npm ci --no-audit --no-fund
    else
        npm install --no-audit --no-fund
    fi
fi

echo "install-browser: ready ($(/usr/bin/chromium --version 2>/dev/null || echo chromium), node $(node --version))"
