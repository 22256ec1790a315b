#!/usr/bin/env bash
# The README's FID table at N = 2000, run row by row, cheapest first, so that an
# interrupted run (the cache in target/eval-cache keeps every finished chunk of 25
# images) resumes where it stopped: rerun this script. The last command prints the
# whole table from the cache. Logs: target/eval-logs/.
#   WORKERS=2 tools/eval/run_n2000.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release
WORKERS=${WORKERS:-2}
N=${N:-2000}
mkdir -p target/eval-logs
ROWS=(real gan vae ddim-10 es-gan-ddim10-50 es-gan-ddim10-100 es-gan-ddim10-200
      es-gan-ddim10-300 es-vae-ddim10-50 es-vae-ddim10-100 es-vae-ddim10-200
      es-vae-ddim10-300 ddim-50 es-gan-ddpm-50 es-vae-ddpm-50 ddpm-100
      es-gan-ddpm-100 es-vae-ddpm-100 es-gan-ddpm-200 es-vae-ddpm-200
      es-gan-ddpm-300 es-vae-ddpm-300 ddpm-1000)
for r in "${ROWS[@]}"; do
  ./target/release/esddpm eval --n "$N" --workers "$WORKERS" --rows "$r" \
    2>&1 | tee -a target/eval-logs/rows.log | tail -n 3
done
./target/release/esddpm eval --n "$N" --json target/eval-logs/eval.json \
  --figure docs/prior_vs_esddpm.png | tee target/eval-logs/table.md
