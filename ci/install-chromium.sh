#!/usr/bin/env bash
# A browser and its WebDriver for tests/test_dashboard_browser.py (which skips, saying why, without them):
# Debian's chromium and chromium-driver (about 1.5 minutes with apt-get update on the 2-core CI machine).
# GitHub's Ubuntu runners already have google-chrome and chromedriver.
set -euo pipefail
for browser in chromium chromium-browser google-chrome; do
    if command -v "$browser" >/dev/null && command -v chromedriver >/dev/null; then
        exit 0
    fi
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver
