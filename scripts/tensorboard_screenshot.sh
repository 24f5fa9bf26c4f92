#!/usr/bin/env bash
# Screenshot of TensorBoard's Time Series page (or another dashboard) for a log directory.
#
#   scripts/tensorboard_screenshot.sh LOGDIR OUT.png [TAG_REGEX] [DASHBOARD]
#
#   LOGDIR     what `tensorboard --logdir` gets, e.g. runs/omniglot_5w1s (the HParams metrics
#              need the model directory or above, not its logs/).
#   OUT.png    the screenshot to write.
#   TAG_REGEX  optional tag filter of the Time Series page, e.g. '^epoch_query_(loss|accuracy)$'.
#   DASHBOARD  optional, default timeseries; also e.g. hparams, custom_scalars.
#
# Environment: PORT (6006), WIDTH (1400), HEIGHT (1800), BUDGET (virtual ms Chromium waits,
# 20000), ATTEMPTS (5), CHROMIUM (chromium; Debian: apt-get install chromium).
#
# It starts tensorboard on 127.0.0.1:PORT, waits until it lists runs, screenshots the page with
# headless Chromium and stops tensorboard. Charts are drawn as SVG (`forceSVG=true`), so a drawn
# chart is in the DOM: the Time Series cards load lazily and are sometimes still empty when the
# virtual time runs out, so the screenshot is retried until the DOM holds a drawn line or image.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
logdir=$1
out=$2
tag_regex=${3:-}
dashboard=${4:-timeseries}
port=${PORT:-6006}
width=${WIDTH:-1400}
height=${HEIGHT:-1800}
budget=${BUDGET:-20000}
attempts=${ATTEMPTS:-5}
chromium=${CHROMIUM:-chromium}
base="http://127.0.0.1:${port}"

[[ -d $logdir ]] || { echo "no such directory: $logdir" >&2; exit 1; }
command -v "$chromium" >/dev/null || { echo "$chromium not found (apt-get install chromium)" >&2; exit 1; }
if curl -s -o /dev/null "$base/"; then
  echo "port $port is already in use; set PORT" >&2
  exit 1
fi

work=$(mktemp -d)
tb_pid=
cleanup() {
  if [[ -n $tb_pid ]]; then
    kill "$tb_pid" 2>/dev/null || true
    wait "$tb_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

tensorboard --logdir="$logdir" --host=127.0.0.1 --port="$port" >"$work/tensorboard.log" 2>&1 &
tb_pid=$!

# Ready when it serves a non-empty run list (it loads the event files in the background).
for _ in $(seq 120); do
  runs=$(curl -sf "$base/data/runs" || true)
  [[ $runs == \[\"* ]] && break
  kill -0 "$tb_pid" 2>/dev/null || { cat "$work/tensorboard.log" >&2; exit 1; }
  sleep 1
done
[[ $runs == \[\"* ]] || { echo "tensorboard lists no runs under $logdir" >&2; exit 1; }
sleep 3  # let the first load finish

query="forceSVG=true"
if [[ -n $tag_regex ]]; then
  query+="&tagFilter=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$tag_regex")"
fi
url="$base/?$query#$dashboard"
sandbox=()
[[ $EUID -eq 0 ]] && sandbox=(--no-sandbox)

for attempt in $(seq "$attempts"); do
  "$chromium" --headless "${sandbox[@]}" --disable-gpu --hide-scrollbars \
    --user-data-dir="$work/profile-$attempt" --window-size="$width,$height" \
    --virtual-time-budget="$budget" --screenshot="$out" --dump-dom "$url" \
    >"$work/dom.html" 2>"$work/chromium.log" || true
  [[ -s $out ]] || { cat "$work/chromium.log" >&2; exit 1; }
  # Legacy dashboards (hparams, custom_scalars) draw inside shadow roots that --dump-dom omits.
  [[ $dashboard == timeseries ]] || break
  # A drawn series is an SVG path "M<x>,<y>L..."; a drawn image card holds an <img>.
  if grep -qE 'd="M-?[0-9.]+,-?[0-9.]+L|<image-card-component[^>]*>.*<img' "$work/dom.html"; then
    break
  fi
  if [[ $attempt == "$attempts" ]]; then
    echo "no chart drawn after $attempts attempts; $out may show empty cards" >&2
    exit 1
  fi
  echo "attempt $attempt: cards not drawn yet, retrying" >&2
done
echo "$out ($url)"
