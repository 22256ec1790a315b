#!/usr/bin/env bash
# Train the four Fashion-MNIST models one after another, then export them to models/fashion/.
#   tools/train/run_all.sh            # fresh run
#   tools/train/run_all.sh --resume   # continue every model from runs/<model>.pt
# Budgets (total wall-clock minutes per model, earlier runs included when resuming) can be
# overridden: CLF_MIN, VAE_MIN, GAN_MIN, UNET_MIN; or UNET_UNTIL=HH:MM (UTC) gives the U-Net
# whatever is left until that time.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-/work/venv/bin/python}
RESUME=${1:-}
CLF_MIN=${CLF_MIN:-5}
VAE_MIN=${VAE_MIN:-10}
GAN_MIN=${GAN_MIN:-15}
UNET_MIN=${UNET_MIN:-70}
mkdir -p logs runs
LOG=logs/run_all.log
echo "=== run_all $(date -u +%FT%TZ) resume='${RESUME}'" >>"$LOG"
run() {
  echo "--- $(date -u +%T) $*" | tee -a "$LOG"
  "$PY" -u "$@" $RESUME 2>&1 | grep --line-buffered -v -i "warning" >>"$LOG"
  echo "--- $(date -u +%T) done $1" | tee -a "$LOG"
}
run train_classifier.py --minutes "$CLF_MIN"
run train_vae.py --minutes "$VAE_MIN"
run train_gan.py --minutes "$GAN_MIN"
if [[ -n "${UNET_UNTIL:-}" ]]; then
  UNET_MIN=$(( ( $(date -u -d "$UNET_UNTIL" +%s) - $(date -u +%s) ) / 60 ))
  if [[ -n "$RESUME" ]]; then  # budget is total: add what the checkpoint already used
    UNET_MIN=$("$PY" -c "import torch;print(int($UNET_MIN+torch.load('runs/unet.pt',weights_only=False)['elapsed']/60))")
  fi
fi
run train_unet.py --minutes "$UNET_MIN"
echo "--- $(date -u +%T) export" | tee -a "$LOG"
"$PY" -u export.py 2>&1 | grep --line-buffered -v -i "warning" >>"$LOG" || echo "export failed (see $LOG)" | tee -a "$LOG"
echo "=== finished $(date -u +%FT%TZ)" | tee -a "$LOG"
