#!/usr/bin/env bash
# Puts the GPU kit's parts together (bench/gpu/README.md): checks each part and the whole against
# SHA256SUMS, then unpacks it. Nothing is unpacked unless every part is there and sound.
# usage: bench/gpu/unpack.sh PARTS_DIR DEST      (DEST/kit is made; an older one is replaced)
set -euo pipefail
PARTS=$1
DEST=$2
say() { echo "unpack.sh: $*" >&2; }
[ -f "$PARTS/SHA256SUMS" ] || { say "$PARTS/SHA256SUMS is missing"; exit 1; }
missing=$(awk '$2 ~ /^part-/ {print $2}' "$PARTS/SHA256SUMS" | while read -r p; do [ -f "$PARTS/$p" ] || echo "$p"; done)
[ -z "$missing" ] || { say "parts missing from $PARTS: $(echo $missing)"; exit 1; }
damaged=$(cd "$PARTS" && grep ' part-' SHA256SUMS | sha256sum -c - 2>/dev/null | grep -v ': OK$' | cut -d: -f1 || true)
[ -z "$damaged" ] || { say "parts damaged (sha256 differs from SHA256SUMS): $(echo $damaged)"; exit 1; }
whole=$(awk '$2 == "kit.tar.xz" {print $1}' "$PARTS/SHA256SUMS")
got=$(cat "$PARTS"/part-* | sha256sum | cut -d' ' -f1)
[ "$got" = "$whole" ] || { say "the parts together do not make kit.tar.xz (sha256 $got, expected $whole)"; exit 1; }
mkdir -p "$DEST"
rm -rf "$DEST/kit.tmp" "$DEST/kit"
mkdir "$DEST/kit.tmp"
cat "$PARTS"/part-* | xz -d | tar -x -C "$DEST/kit.tmp" --strip-components=1
(cd "$DEST/kit.tmp" && sha256sum --quiet -c MANIFEST) || { say "unpacked files differ from the kit's MANIFEST"; exit 1; }
mv "$DEST/kit.tmp" "$DEST/kit"
say "unpacked to $DEST/kit ($(du -sh "$DEST/kit" | cut -f1))"
