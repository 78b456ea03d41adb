#!/usr/bin/env bash
# Device-call wrapper (the lent H200 has no network; carry [".whl", ".devjobs"]):
#   JOBS="name:budget_s ..." bash scripts/device/run_jobs.sh
# runs .devjobs/<name>/run.sh for each job under its own timeout with $JOB_OUT=$OUT/<name>,
# kills leftover GPU processes between jobs. A call returns at most 8 files: tar $OUT.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > $OUT/pip.txt 2>&1
export PYTHONPATH=/tmp/site:src
ln -sfn $PWD/conf src/lmcache/conf
nvidia-smi > $OUT/nvidia-smi.txt 2>&1
for spec in $JOBS; do
  job=${spec%%:*}; b=${spec##*:}
  export JOB_OUT=$OUT/$job; mkdir -p $JOB_OUT
  if [ ! -f .devjobs/$job/run.sh ]; then echo "no run.sh" > $JOB_OUT/rc; continue; fi
  start=$(date +%s)
  timeout -k 5 $b bash .devjobs/$job/run.sh > $JOB_OUT/stdout.txt 2>&1
  rc=$?
  echo "rc=$rc seconds=$(( $(date +%s) - start )) budget=$b" > $JOB_OUT/rc
  echo "$job: rc=$rc seconds=$(( $(date +%s) - start ))"
  nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
  sleep 1
done
