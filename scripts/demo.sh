#!/usr/bin/env bash
# `make demo`: demo data → protect → inspect, end to end on 2 CPU cores.
set -euo pipefail
VENV=${VENV:-.venv}
DEMO_DIR=${DEMO_DIR:-demo_output}
CLI="$VENV/bin/uge-protect"
export HF_HOME=${HF_HOME:-$PWD/$DEMO_DIR/hf_home}

# The strongest method this build offers. Only the `random` control exists so far: it does
# NOT protect; it exercises the whole pipeline until EM / T2UE / UGE land.
METHOD=${METHOD:-random}

rm -rf "$DEMO_DIR"
echo "== 1/3 demo dataset → $DEMO_DIR/data"
"$CLI" demo-data "$DEMO_DIR/data" --train 5000 --test 1000 --per-shard 500

echo "== 2/3 protect the training shards with --method $METHOD → $DEMO_DIR/protected"
"$CLI" shard "$DEMO_DIR/data/train/demo-train-{000000..000009}.tar" \
    --output "$DEMO_DIR/protected" --method "$METHOD" --log-json "$DEMO_DIR/protect.log.jsonl"

echo "== 3/3 inspect and verify the output"
"$CLI" inspect "$DEMO_DIR/protected"

cat <<MSG

Done. Outputs:
  demo data          $DEMO_DIR/data/{train,test}/*.tar
  protected shards   $DEMO_DIR/protected/shards/*.tar   (+ sizes.json for open_clip)
  manifests          $DEMO_DIR/protected/manifests/*.parquet
  run summary        $DEMO_DIR/protected/protection.json
  progress log       $DEMO_DIR/protect.log.jsonl
MSG
if [ "$METHOD" = "random" ]; then
  echo "Note: 'random' is a control that does not protect; EM, T2UE and UGE are not in this build yet."
fi
