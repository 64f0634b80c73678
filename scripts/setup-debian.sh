#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks use, if they are missing:
#   dcmtk            real DICOM peers (storescu, findscu, movescu, getscu, echoscu, storescp)
#   python3-pydicom  real DICOM test files (CT, MR, JPEG, JPEG 2000, JPEG-LS, RLE, deflate, big endian)
#   debootstrap      builds the cached Debian trixie chroot with Orthanc 1.12 (scripts/orthanc-testbed.ts)
#   systemd          systemd-analyze, to verify the hardened unit
#   openssl          the test bed's TLS proxy makes its CA and certificates with it
#   curl             tests of the TLS proxy (client certificates, wrong CA)
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
[ -d /usr/lib/python3/dist-packages/pydicom/data/test_files ] || need+=(python3-pydicom)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-debian: dcmtk, python3-pydicom, debootstrap, systemd-analyze, openssl and curl are present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup-debian: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
