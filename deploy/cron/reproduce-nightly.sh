#!/usr/bin/env bash
# Nightly reproductions on a VM cluster started with `ray start` (deploy/README.md, "VMs without Kubernetes").
# Runs each recipe as a driver on this machine (the head), connected to the cluster through RAY_ADDRESS, and
# exits 1 if any recipe regressed (cron mails the output to MAILTO). Settings come from an env file kept out of
# the repository, readable by this user only (chmod 600), e.g. /etc/itr/itr.env with
#   MLFLOW_TRACKING_URI=http://mlflow.internal:5000  MLFLOW_TRACKING_USERNAME=...  MLFLOW_TRACKING_PASSWORD=...
#   RAY_ADDRESS=auto  ITR_COCO_MINI=/data/coco-mini  (and the ITR_* inputs of the paper recipes)
#   ITR_NOTIFY_URLS="slack://... json://hooks.internal:8080/itr"  (optional: apprise URLs told of a regression and
#   of the recovery after one, read by the reproduce command)
set -uo pipefail
ITR_HOME="${ITR_HOME:-/opt/itr}"          # the checkout, with its .venv (make setup)
ENV_FILE="${ITR_ENV_FILE:-/etc/itr/itr.env}"
RECIPES="${RECIPES:-coco_mini_tiny.yaml synthetic_tiny.yaml}"

cd "$ITR_HOME" || exit 2
set -a
# shellcheck disable=SC1090
[ -f "$ENV_FILE" ] && . "$ENV_FILE"
set +a
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

rc=0
for recipe in $RECIPES; do
  echo "== $(date -u +%FT%TZ) itr reproduce recipes/$recipe"
  .venv/bin/itr reproduce "recipes/$recipe" --against-last-pass || rc=1
done
exit $rc
