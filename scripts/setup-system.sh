#!/usr/bin/env bash
# Installs the Debian packages aha uses: offline corpora (KJV Bible, Python and Linux docs)
# and Chromium for the HTML report's rendering test. Skips what is already there.
set -euo pipefail
packages=(bible-kjv python3.11-doc linux-doc-6.1 chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "aha: cannot install ${missing[*]} (not root, no sudo); corpora and the browser test will be skipped" >&2
  exit 0
fi
echo "aha: installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
