#!/usr/bin/env bash
# The tests: install with the test extras, then pytest. Arguments go to pytest (--runslow for the slow tier).
source "$(dirname "$0")/env.sh" test
exec .venv/bin/python -m pytest "$@"
