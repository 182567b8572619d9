#!/usr/bin/env bash
# Installs Debian's chromium + chromium-driver for tests/test_browser.py when they are missing.
# Idempotent and quiet; never fails the caller: without root or apt-get it says why and exits 0
# (the browser test then skips with a reason). Never downloads a browser any other way.
set -u

CHROMIUM=${IMRET_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${IMRET_CHROMEDRIVER:-/usr/bin/chromedriver}

if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_browser: chromium/chromedriver missing and not root; the browser test will skip" \
         "(install them with: sudo apt-get install chromium chromium-driver)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium/chromedriver missing and no apt-get here; the browser test will skip"
    exit 0
fi
echo "install_browser: installing chromium and chromium-driver with apt-get (once)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation; } >/tmp/imret-install-browser.log 2>&1; then
    echo "install_browser: apt-get failed (see /tmp/imret-install-browser.log); the browser test will skip"
    exit 0
fi
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    echo "install_browser: chromium and chromedriver installed"
else
    echo "install_browser: apt-get finished but $CHROMIUM / $CHROMEDRIVER are still missing; the browser test will skip"
fi
exit 0
