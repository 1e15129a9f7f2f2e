#!/usr/bin/env bash
# Fail on any undeclared, unused or misplaced third-party import (configuration: [tool.deptry]).
set -euo pipefail
cd "$(dirname "$0")/.."
# 1. The whole tree against every dependency: nothing imported that is not declared, nothing declared unused.
deptry .
# 2. The installed package alone: it must not import anything declared only for tests or benchmarks.
deptry . --extend-exclude "tests|benchmarks|scripts" --optional-dependencies-dev-groups test,bench \
  --ignore DEP001,DEP002
