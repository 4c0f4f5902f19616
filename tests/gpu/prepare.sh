#!/usr/bin/env bash
# Run HERE (the development machine) before lending a GPU: fills .gpu/ (git-ignored, carried by the
# device tool: carry [".gpu"]) with what the GPU image lacks: the wheels of hqq, cma, gguf and
# termcolor (Python 3.12, no deps), and SmolLM2-135M-Instruct's config and tokenizer (its weights
# are 514 MB, over the 64 MiB a call carries: on the GPU the SmolLM2-shaped model is random).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/wheels .gpu/smollm2
PY=${PY:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "hqq==0.2.8.post1" "cma==4.5.0" "gguf==0.19.0" "termcolor==3.1.0"
MODEL=$($PY -c "from workbench.models.default_model import prepare_default; print(prepare_default())")
cp "$MODEL"/config.json "$MODEL"/generation_config.json "$MODEL"/tokenizer.json "$MODEL"/tokenizer_config.json .gpu/smollm2/
du -sh .gpu
