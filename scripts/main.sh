#!/usr/bin/env bash
# The main job on the embedded default model. Args go to `python -m mrp_pass.pipeline` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m mrp_pass.pipeline "$@"
