#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after the other, seeded
# from the repository's configs and models, and prints each target's executions.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz`).
# Corpora grow in fuzz/corpus/<target>, crashes land in fuzz/artifacts/<target> (both
# ignored by git); a crash is a failure of this script. Logs: fuzz/logs/<target>.log.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_parser model_bytes sampler c_api)

# Seeds: the config files as they are; each model prefixed by the byte that picks
# the role it is loaded as (0 U-Net, 1 prior, 2 class-conditional prior).
seed() { mkdir -p "fuzz/corpus/$1"; }
seed config_parser
for f in tests/models/tiny/*.json models/fashion/*.json; do
  cp "$f" "fuzz/corpus/config_parser/$(echo "$f" | tr / _)"
done
seed model_bytes
add_model() { { printf "\\x$1"; cat "$2"; } > "fuzz/corpus/model_bytes/$1_$(basename "$2")"; }
add_model 00 tests/models/tiny/unet.onnx
add_model 01 tests/models/tiny/prior.onnx
add_model 02 tests/models/tiny/prior_cond.onnx
for f in tests/models/broken/unet_*.onnx tests/models/broken/not_onnx.onnx; do add_model 00 "$f"; done
for f in tests/models/broken/prior_*.onnx; do add_model 01 "$f"; done
seed sampler
seed c_api

cargo +nightly fuzz build
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s"
  # rss_limit: 2 GiB (the targets load models under a 256 MiB / 16 MiB memory limit);
  # timeout: one input may take 60 s (a 1000-step generation of the tiny model).
  status=0
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=60 -print_final_stats=1 \
    > "fuzz/logs/$t.log" 2>&1 || status=$?
  if [ "$status" != 0 ]; then
    # A crash, leak, timeout or out-of-memory writes an artifact and fails the run. (Seen
    # once: exit status 70 after libFuzzer printed "Done N runs" with no artifact and no
    # ALARM; that is reported, not counted as a finding.)
    if ls "fuzz/artifacts/$t"/* > /dev/null 2>&1 || ! grep -q "^Done [0-9]* runs" "fuzz/logs/$t.log"; then
      tail -60 "fuzz/logs/$t.log"; exit 1
    fi
    echo "note: $t exited with status $status after a completed run and no artifact"
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added" "fuzz/logs/$t.log"
  echo "corpus: $(ls "fuzz/corpus/$t" | wc -l) inputs"
done
