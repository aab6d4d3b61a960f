#!/usr/bin/env bash
# Makes the GPU kit (bench/gpu/README.md): what the lent GPU machine lacks, as xz parts small
# enough for one device call each, with their sha256 sums:
#   node/bin/node                 this machine's Node (the device has none)
#   app/dist, app/data            the built project and its own small data set
#   app/node_modules/...          the packages the kit's code loads (engine.js modules), with
#                                 onnxruntime-node and onnxruntime-common 1.29.0 in place of the
#                                 project's 1.30.0, and onnxruntime's 1.29.0 CUDA 13 provider
#                                 (libonnxruntime_providers_{cuda,shared}.so) beside its library
#   answer_lengths.json           the reference transcripts' assistant answers' lengths (tokens)
#
# usage: bench/gpu/pack.sh [OUT_DIR]        (after `make build`; OUT_DIR default .axis/gpu-kit)
# environment: AXIS_GPU_KIT_PART_MIB (56) the part size; AXIS_GPU_KIT_PROVIDER_DIR a folder holding
# the two provider libraries, AXIS_GPU_KIT_ORT_DIR and AXIS_GPU_KIT_COMMON_DIR unpacked
# onnxruntime-node and onnxruntime-common packages (all three instead of the npm registry: the
# kit's test); AXIS_GPU_KIT_XZ_LEVEL (6); AXIS_UPSTREAM_DATA as for the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.axis/gpu-kit}
PART_MIB=${AXIS_GPU_KIT_PART_MIB:-56}
ORT_VERSION=1.29.0
PROVIDER_PACKAGE=com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9
PROVIDER_PATH=package/Plugins/Linux/x64
BINDING=node_modules/onnxruntime-node/bin/napi-v6/linux/x64
TRANSCRIPTS=$(dirname "${AXIS_UPSTREAM_DATA:-../shared/upstream/data}")/transcripts/persona_drift
CACHE=.axis/gpu-kit-cache # registry downloads, kept between packs
say() { echo "pack.sh: $*" >&2; }

[ -f dist/bench/gpu/engine.js ] || { say "dist/bench/gpu/engine.js is missing: run make build first"; exit 1; }
[ -d "$TRANSCRIPTS" ] || { say "$TRANSCRIPTS is missing (set AXIS_UPSTREAM_DATA)"; exit 1; }
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
KIT=$STAGE/kit
mkdir -p "$KIT/node/bin" "$KIT/app/dist/bench" "$CACHE"

cp "$(readlink -f "$(command -v node)")" "$KIT/node/bin/node"
cp package.json "$KIT/app/"
cp -r data "$KIT/app/"
cp -r dist/services dist/gen "$KIT/app/dist/"
cp -r dist/bench/gpu "$KIT/app/dist/bench/"
for m in $(node dist/bench/gpu/engine.js modules); do
  mkdir -p "$KIT/app/$(dirname "$m")"
  cp -r "$m" "$KIT/app/$m"
done

# onnxruntime-node and -common of the provider's version (the provider bridge is an unversioned C++ ABI).
fetch() { # package@version -> an unpacked package folder under $CACHE
  local name=${1%@*} version=${1##*@} dir=$CACHE/${1//\//_}
  if [ ! -d "$dir" ]; then
    (cd "$CACHE" && npm pack --silent "$1" >/dev/null)
    mkdir -p "$dir.tmp" && tar -xzf "$CACHE/$(echo "$name" | sed 's|^@||; s|/|-|')-$version.tgz" -C "$dir.tmp" && mv "$dir.tmp/package" "$dir" && rm -rf "$dir.tmp"
  fi
  echo "$dir"
}
ORT=${AXIS_GPU_KIT_ORT_DIR:-$(fetch "onnxruntime-node@$ORT_VERSION")}
COMMON=${AXIS_GPU_KIT_COMMON_DIR:-$(fetch "onnxruntime-common@$ORT_VERSION")}
rm -rf "$KIT/app/node_modules/onnxruntime-node" "$KIT/app/node_modules/onnxruntime-common"
cp -r "$ORT" "$KIT/app/node_modules/onnxruntime-node"
cp -r "$COMMON" "$KIT/app/node_modules/onnxruntime-common"
# Other platforms' binaries are left out.
NAPI=$KIT/app/node_modules/onnxruntime-node/bin/napi-v6
find "$NAPI" -mindepth 1 -maxdepth 1 ! -name linux -exec rm -rf {} +
find "$NAPI/linux" -mindepth 1 -maxdepth 1 ! -name x64 -exec rm -rf {} +
rm -rf "$KIT/app/node_modules/@koromix/koffi-linux-x64/musl_x64"

if [ -n "${AXIS_GPU_KIT_PROVIDER_DIR:-}" ]; then
  cp "$AXIS_GPU_KIT_PROVIDER_DIR"/libonnxruntime_providers_{cuda,shared}.so "$KIT/app/$BINDING/"
else
  PROVIDER=$CACHE/provider-0.4.9
  if [ ! -f "$PROVIDER/libonnxruntime_providers_cuda.so" ]; then
    (cd "$CACHE" && npm pack --silent "$PROVIDER_PACKAGE" >/dev/null)
    mkdir -p "$PROVIDER"
    tar -xzf "$CACHE/com.github.asus4.onnxruntime.linux-x64-gpu-0.4.9.tgz" -C "$PROVIDER" --strip-components=4 "$PROVIDER_PATH/libonnxruntime_providers_cuda.so" "$PROVIDER_PATH/libonnxruntime_providers_shared.so"
  fi
  cp "$PROVIDER"/libonnxruntime_providers_{cuda,shared}.so "$KIT/app/$BINDING/"
fi

node dist/bench/gpu/engine.js lengths --transcripts "$TRANSCRIPTS" --out "$KIT/answer_lengths.json"
(cd "$KIT" && find . -type f ! -name MANIFEST -exec sha256sum {} + | sort -k2 > MANIFEST)
say "kit: $(du -sh "$KIT" | cut -f1) unpacked; compressing"
tar -C "$STAGE" -cf - kit | xz -T0 "-${AXIS_GPU_KIT_XZ_LEVEL:-6}" > "$STAGE/kit.tar.xz"
rm -rf "$OUT" && mkdir -p "$OUT"
split -b "${PART_MIB}m" -d -a 2 "$STAGE/kit.tar.xz" "$OUT/part-"
(cd "$STAGE" && sha256sum kit.tar.xz) > "$OUT/SHA256SUMS"
(cd "$OUT" && sha256sum part-*) >> "$OUT/SHA256SUMS"
say "$(ls "$OUT" | grep -c part-) parts of at most $PART_MIB MiB in $OUT ($(du -sh "$STAGE/kit.tar.xz" | cut -f1) in all)"
