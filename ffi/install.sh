#!/usr/bin/env bash
# Installs libesddpm.a, libesddpm.so, esddpm.h and a pkg-config file (esddpm.pc):
#   ffi/install.sh PREFIX [LIB_DIR]
# LIB_DIR: where the libraries were built (default target/release; built if missing).
# Then: PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc app.c $(pkg-config --cflags --libs esddpm)
# (or --static for libesddpm.a).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
prefix="${1:?usage: ffi/install.sh PREFIX [LIB_DIR]}"
libdir="${2:-$root/target/release}"
if [[ ! -f "$libdir/libesddpm.a" ]]; then
  cargo build --release -p esddpm-ffi --manifest-path "$root/Cargo.toml"
  libdir="$root/target/release"
fi
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 644 "$libdir/libesddpm.a" "$prefix/lib/"
install -m 755 "$libdir/libesddpm.so" "$prefix/lib/"
install -m 644 "$root/include/esddpm.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/esddpm.pc.in" \
  > "$prefix/lib/pkgconfig/esddpm.pc"
echo "installed esddpm $version into $prefix"
