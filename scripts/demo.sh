#!/usr/bin/env bash
# `make demo`: demo data → fit EM → protect → inspect → a short evaluation, on 2 CPU cores.
set -euo pipefail
VENV=${VENV:-.venv}
DEMO_DIR=${DEMO_DIR:-demo_output}
CLI="$VENV/bin/uge-protect"
export HF_HOME=${HF_HOME:-$PWD/$DEMO_DIR/hf_home}

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
echo "== 1/5 demo dataset → $DEMO_DIR/data"
"$CLI" demo-data "$DEMO_DIR/data" --train 5000 --test 1000 --per-shard 500

# The strongest method this build offers that fits in a few minutes on a CPU: class-wise EM
# (one δ per class). Sample-wise EM (--mode sample) takes ≈ 4 min more to fit and is slower to apply.
echo "== 2/5 fit class-wise EM on the training shards → $DEMO_DIR/em-artifact"
"$CLI" fit em "$DEMO_DIR/data/train/demo-train-{000000..000009}.tar" --output "$DEMO_DIR/em-artifact" --mode class

echo "== 3/5 protect the training shards → $DEMO_DIR/protected"
"$CLI" shard "$DEMO_DIR/data/train/demo-train-{000000..000009}.tar" \
    --output "$DEMO_DIR/protected" --method em --artifact "$DEMO_DIR/em-artifact" \
    --log-json "$DEMO_DIR/protect.log.jsonl"

echo "== 4/5 inspect and verify the output"
"$CLI" inspect "$DEMO_DIR/protected"

echo "== 5/5 evaluate: a small CNN trained on protected vs clean shards, tested on clean test shards"
"$CLI" eval --protected "$DEMO_DIR/protected" --clean-train "$DEMO_DIR/data/train/*.tar" \
    --test "$DEMO_DIR/data/test/*.tar" --arch small_cnn --defense none --defense grayscale \
    --output "$DEMO_DIR/report"

cat <<MSG

Done. Outputs:
  demo data          $DEMO_DIR/data/{train,test}/*.tar
  EM artifact        $DEMO_DIR/em-artifact/ (config.json + safetensors)
  protected shards   $DEMO_DIR/protected/shards/*.tar   (+ sizes.json for open_clip)
  manifests          $DEMO_DIR/protected/manifests/*.parquet
  run summary        $DEMO_DIR/protected/protection.json
  evaluation         $DEMO_DIR/report/report.md (+ report.json, PNG figures)
MSG
