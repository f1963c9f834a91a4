#!/usr/bin/env bash
# uffdd set-up for a fresh Debian machine, as root:
#
#   deploy/setup.sh demo    install everything, build, run the demo migration
#   deploy/setup.sh test    install everything, build, run the whole test suite
#
# Installs the Debian packages the project needs (build tools and msgpack-c for
# native/, promtool and systemd-analyze for the deployment-file checks, openssl
# for the TLS tests; dpkg-dev, debhelper and lintian for deploy/build-deb.sh,
# debootstrap and systemd-nspawn for the real-systemd test of the package;
# qemu-system-x86 for the bench's versus-qemu scenario and its test),
# creates .venv with uffdd and its test tools, builds native/.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
DEBS=(build-essential pkg-config libmsgpack-dev python3 python3-venv python3-dev zlib1g-dev
      openssl prometheus systemd iproute2 util-linux
      dpkg-dev debhelper lintian debootstrap systemd-container qemu-system-x86)

want="${1:-}"
case "$want" in
  demo|test) shift ;;
  *) echo "usage: $0 demo|test [extra arguments for uffdd demo / pytest]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "uffdd needs root (userfaultfd, /dev/kvm, hugetlb pages): run as root" >&2
  exit 1
fi

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Services pulled in by packages (prometheus) must not start here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "uffdd needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "== installing uffdd into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q -e ".[test]"

echo "== building native/"
make -s -C native

export PATH="$VENV/bin:$PATH"
case "$want" in
  demo)
    exec "$VENV/bin/uffdd" demo "$@"
    ;;
  test)
    echo "== static checks"
    "$VENV/bin/ruff" check uffdd tests
    "$VENV/bin/mypy" --strict uffdd
    echo "== test suite"
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
    ;;
esac
