#!/usr/bin/env bash
# The one test command: start (or install) RabbitMQ and the FHIR server, then run every test.
#   scripts/test.sh [cargo test args...]
# The pipeline tests talk to RabbitMQ at IOMT_TEST_AMQP_URL (default 127.0.0.1:5672) and the FHIR
# server at IOMT_TEST_FHIR_URL (default http://127.0.0.1:8090/fhir); they fail when either is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-build
cargo test "$@"
