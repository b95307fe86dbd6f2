#!/usr/bin/env bash
# Install the Debian packages the DICOMweb and browser tests need: a local Orthanc with its DICOMweb
# plugin, and Chromium with its WebDriver. Idempotent: returns at once when everything is present,
# and runs `apt-get update` only when something is missing.
set -euo pipefail

packages=(orthanc orthanc-dicomweb chromium chromium-driver)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "services.sh: all present (${packages[*]})"
    exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "services.sh: installing ${missing[*]}"
$sudo apt-get update -qq
# The Debian orthanc package starts a system service on its default ports where a service manager
# runs; the tests start their own Orthanc on free ports and do not need it.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
