#!/usr/bin/env bash
# Copies what an unfinished training run needs to continue elsewhere: its config, the newest
# training-state save, the best save and weights, and its TensorBoard logs (the validation
# curve). About 3.5 MB for Omniglot's conv4, so a run longer than one machine's life can be
# kept in the repository (experiments/unfinished/) and continued from there:
#
#   scripts/snapshot_run.sh runs/omniglot_5w5s experiments/unfinished/omniglot_5w5s
#   cp -r experiments/unfinished/omniglot_5w5s runs/omniglot_5w5s    # on the next machine
#   python main.py --flagfile=experiments/omniglot_5w5s.flags --data_dir=DIR
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: scripts/snapshot_run.sh RUN_DIR OUT_DIR" >&2
  exit 2
fi
run=${1%/}
out=${2%/}
latest="$run/checkpoints/maml/latest"
if [[ ! -f "$run/config.json" || ! -f "$latest/checkpoint" ]]; then
  echo "error: $run holds no training run with a save (config.json, $latest/checkpoint)" >&2
  exit 1
fi

# The index names the newest save as a path relative to its directory: ckpt-N.
newest=$(sed -n 's/^model_checkpoint_path: "\(.*\)"$/\1/p' "$latest/checkpoint")
newest=${newest##*/}
if [[ -z "$newest" || ! -f "$latest/$newest.index" ]]; then
  echo "error: $latest/checkpoint names no save that is there ($newest)" >&2
  exit 1
fi

staging="$out.partial"
rm -rf "$staging"
mkdir -p "$staging/checkpoints/maml/latest"
cp "$run/config.json" "$staging/"
cp "$latest/$newest".* "$staging/checkpoints/maml/latest/"
# The index without the older saves. tf.train.CheckpointManager pairs each listed save with its
# timestamp and forgets saves without one, so the newest save's timestamp (the last) is kept.
stamp=$(sed -n 's/^all_model_checkpoint_timestamps: //p' "$latest/checkpoint" | tail -n 1)
{
  printf 'model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' "$newest" "$newest"
  if [[ -n "$stamp" ]]; then printf 'all_model_checkpoint_timestamps: %s\n' "$stamp"; fi
  grep '^last_preserved_timestamp: ' "$latest/checkpoint" || true
} > "$staging/checkpoints/maml/latest/checkpoint"
if [[ -d "$run/checkpoints/maml/best" ]]; then
  cp -r "$run/checkpoints/maml/best" "$staging/checkpoints/maml/"
fi
for file in best.weights.h5 results.json; do
  if [[ -f "$run/$file" ]]; then cp "$run/$file" "$staging/"; fi
done
if [[ -d "$run/logs" ]]; then cp -r "$run/logs" "$staging/"; fi
# Replaced whole, so a snapshot is never half old, half new.
rm -rf "$out"
mv "$staging" "$out"
echo "$out: $newest of $run"
