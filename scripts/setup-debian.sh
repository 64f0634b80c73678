#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks use, if they are missing:
#   dcmtk            real DICOM peers (storescu, findscu, movescu, getscu, echoscu, storescp)
#   python3-pydicom  real DICOM test files (CT, MR, JPEG, JPEG 2000, JPEG-LS, RLE, deflate, big endian)
#   debootstrap      builds the cached Debian trixie chroot with Orthanc 1.12 (scripts/orthanc-testbed.ts)
#   systemd          systemd-analyze, to verify the hardened unit
#   openssl          the test bed's TLS proxy makes its CA and certificates with it
#   curl             tests of the TLS proxy (client certificates, wrong CA)
#   qemu-user-static user-mode emulation: test/binary.test.ts runs the arm64 executable with
#                    `qemu-aarch64-static -L /` (no binfmt_misc registration needed, so it works in
#                    a container too)
#   libc6:arm64      the arm64 C runtime, through multiarch (`dpkg --add-architecture arm64`): the
#                    Bun arm64 executable needs only the loader /lib/ld-linux-aarch64.so.1, libc,
#                    libm, libpthread and libdl, all in libc6 (its runtime links libstdc++ statically)
# Packages of another architecture come from the mirrors in the machine's own apt sources.
# Idempotent, and cheap when everything is present (file checks only, no apt or dpkg call);
# needs root (or sudo) only when something is missing.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
[ -d /usr/lib/python3/dist-packages/pydicom/data/test_files ] || need+=(python3-pydicom)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
# qemu-user-static: qemu-aarch64-static on Debian 12; also accept qemu-user's qemu-aarch64.
command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user-static)
arm64_libc=no
[ -e /usr/lib/aarch64-linux-gnu/libc.so.6 ] && [ -e /lib/ld-linux-aarch64.so.1 ] || { need+=(libc6:arm64); arm64_libc=yes; }
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-debian: dcmtk, python3-pydicom, debootstrap, systemd-analyze, openssl, curl, qemu-aarch64 and the arm64 libc are present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup-debian: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# Another apt on the machine (unattended upgrades) holds the lock for a while: wait for it.
APT=(-o DPkg::Lock::Timeout=300)
if [ "$arm64_libc" = yes ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup-debian: adding the arm64 architecture (dpkg --add-architecture arm64)"
  $SUDO dpkg --add-architecture arm64
fi
$SUDO apt-get "${APT[@]}" update -qq
$SUDO apt-get "${APT[@]}" install -y -qq --no-install-recommends "${need[@]}"
