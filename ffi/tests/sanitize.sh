#!/usr/bin/env bash
# Runs the C test program (ffi/tests/c/api_test.c, every function and error path) and
# the C/C++ examples under AddressSanitizer + UndefinedBehaviorSanitizer, and the C test
# under Valgrind (memcheck: no errors, no definite/indirect/possible leaks). Needs
# libesddpm.a built first (`cargo build -p esddpm-ffi`, or pass its folder).
#   ffi/tests/sanitize.sh [LIB_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
lib="${1:-$root/target/debug}"
models="$root/models/fashion"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sys=(-lpthread -ldl -lm -lrt -lutil -lgcc_s)
inc=(-I "$root/include")

echo "-- AddressSanitizer + UndefinedBehaviorSanitizer"
san=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g -O1)
cc -std=c99 -Wall -Wextra -Werror "${san[@]}" "${inc[@]}" "$root/ffi/tests/c/api_test.c" \
  -o "$tmp/api_asan" "$lib/libesddpm.a" "${sys[@]}"
cc -std=c99 -Wall -Wextra -Werror "${san[@]}" "${inc[@]}" "$root/examples/c/generate.c" \
  -o "$tmp/gen_asan" "$lib/libesddpm.a" "${sys[@]}"
c++ -std=c++17 -Wall -Wextra -Werror "${san[@]}" "${inc[@]}" "$root/examples/cpp/session.cpp" \
  -o "$tmp/session_asan" "$lib/libesddpm.a" "${sys[@]}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$tmp/api_asan" "$models" "$tmp/bytes.bin"
"$tmp/gen_asan" "$models" "$tmp/g.pgm" 1 > /dev/null
"$tmp/session_asan" "$models" "$tmp/s.pgm" 1 > /dev/null
# An error path of each example: a missing model folder.
if "$tmp/gen_asan" /nonexistent "$tmp/x.pgm" 2> /dev/null; then exit 1; fi
if "$tmp/session_asan" /nonexistent "$tmp/x.pgm" 2> /dev/null; then exit 1; fi
echo "ASan/UBSan: clean"

echo "-- Valgrind"
cc -std=c99 -g -O1 "${inc[@]}" "$root/ffi/tests/c/api_test.c" -o "$tmp/api" \
  "$lib/libesddpm.a" "${sys[@]}"
vg=(valgrind --error-exitcode=3 --suppressions="$root/ffi/tests/valgrind.supp" --leak-check=full --show-leak-kinds=definite,indirect,possible
    --errors-for-leak-kinds=definite,indirect,possible -q)
"${vg[@]}" "$tmp/api" "$models" "$tmp/bytes.bin"
echo "Valgrind: clean"
