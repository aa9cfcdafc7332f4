#!/usr/bin/env bash
# The CPU pipeline, called by the GitHub workflow: the same nox sessions as the local CI entry point.
set -euo pipefail
exec bash "$(dirname "$0")/../.ci/run"
