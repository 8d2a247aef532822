#!/usr/bin/env bash
# Reproduce the paper's math tables under SLURM: submits, with dependencies between them,
#   1. the base-model temperature sweeps (0.0 .. 1.6 step 0.1, n = 32, six benchmarks; the
#      baseline is each base model at its best temperature),
#   2. one training job per paper row (examples/paper/*.yaml, through examples/sept.sbatch:
#      preemption-safe, requeued, resumed),
#   3. the final evaluation of each trained model at T = 1 (the paper's), after its training.
# Then `sept-megatron paper-table` prints Table 1/4/5 from the sweeps (command printed below).
#   BENCH=/data/benchmarks bash examples/paper/run_paper.sh [RECIPE.yaml ...]   # default: all rows
# Each job takes one node of 8 GPUs; see README "Reproducing the paper" for the GPU hours.
set -euo pipefail
BENCH=${BENCH:-/data/benchmarks}
EVAL_DIR=${EVAL_DIR:-runs/paper/eval}
SBATCH=${SBATCH:-sbatch}
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(examples/paper/*.yaml)
mkdir -p "$EVAL_DIR"

field() {  # field RECIPE section.name: the resolved value, through the config loader
  python -m sept_megatron.cli config --config "$1" | python -c \
    "import sys, yaml; section, name = sys.argv[1].split('.'); print(yaml.safe_load(sys.stdin)[section][name])" "$2"
}
sweep_job() {  # sweep_job NAME MODEL_DIR DEPENDENCY [eval args...]: submits, prints the job id
  local name=$1 model=$2 dependency=$3
  shift 3
  $SBATCH --parsable --job-name="sweep-$name" --nodes=1 --gres=gpu:8 --ntasks-per-node=1 \
    ${dependency:+--dependency=afterok:$dependency} --output="$EVAL_DIR/$name-%j.out" \
    --wrap="torchrun --nproc-per-node=8 -m sept_megatron.cli eval --model $model \
            --benchmarks $BENCH --samples 32 --backend sglang --out $EVAL_DIR/$name $*"
}

declare -A base_done
table_args=()
for recipe in "${recipes[@]}"; do
  model=$(field "$recipe" model.hf_path)
  template=$(field "$recipe" data.chat_template)
  base=$(basename "$model")
  if [ -z "${base_done[$base]:-}" ]; then  # one base sweep per model (the default 17-point grid)
    base_done[$base]=$(sweep_job "base-$base" "$model" "" --template "$template")
    echo "base sweep of $base: job ${base_done[$base]}"
  fi
  row=$(basename "$recipe" .yaml)
  run_dir=$(field "$recipe" logging.run_dir)
  train=$($SBATCH --parsable --nodes=1 --gres=gpu:8 examples/sept.sbatch "$recipe")
  final=$(sweep_job "$row" "$run_dir/hf_final" "$train" --template "$template" --temperatures 1.0)
  echo "$row: training job $train, final evaluation job $final"
  table_args+=("$row=$EVAL_DIR/$row")
done
echo
echo "when every job is done, per base model:"
echo "  sept-megatron paper-table base=$EVAL_DIR/base-<MODEL> ${table_args[*]}"
