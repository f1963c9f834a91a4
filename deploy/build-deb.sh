#!/usr/bin/env bash
# Build the Debian package of uffdd from this checkout:
#
#   deploy/build-deb.sh [OUTDIR]     writes OUTDIR/uffdd_<version>_amd64.deb (default: build/deb)
#
# Copies the checkout's files (tracked and untracked, not ignored: no .venv, no
# native/build) to a temporary directory, adds deploy/debian as debian/, and runs
# dpkg-buildpackage there. Needs dpkg-dev, debhelper, python3-venv, pkg-config,
# libmsgpack-dev and zlib1g-dev (deploy/setup.sh installs them), and PyPI (or a pip
# mirror) for the pinned wheels of deploy/debian/requirements.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=$(realpath -m "${1:-$ROOT/build/deb}")

for tool in dpkg-buildpackage dh dpkg-parsechangelog; do
  command -v "$tool" >/dev/null || {
    echo "$tool not found: apt-get install dpkg-dev debhelper (or run deploy/setup.sh test)" >&2
    exit 1
  }
done

version=$(dpkg-parsechangelog -l deploy/debian/changelog -S Version)
upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
if [ "${version%%[-+~]*}" != "$upstream" ]; then
  echo "deploy/debian/changelog is at $version but pyproject.toml at $upstream:" \
       "add a changelog entry for $upstream" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/uffdd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/uffdd-$upstream"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # What the checkout holds now, edits included; deleted files are skipped.
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$SRC"
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./native/build --exclude=./build -cf - . |
    tar -C "$SRC" -xf -
fi
rm -rf "$SRC/debian"
cp -r deploy/debian "$SRC/debian"

echo "== building uffdd $version in $SRC"
mkdir -p "$OUT"
(cd "$SRC" && dpkg-buildpackage -b -us -uc) > "$WORK/build.log" 2>&1 || {
  cp "$WORK/build.log" "$OUT/build.log"
  tail -40 "$WORK/build.log" >&2
  echo "dpkg-buildpackage failed (last lines above)" >&2
  exit 1
}
mkdir -p "$OUT"
cp "$WORK/build.log" "$OUT/build.log"
deb="uffdd_${version}_$(dpkg-architecture -qDEB_HOST_ARCH).deb"
mv "$WORK/$deb" "$OUT/"
echo "$OUT/$deb"
