#!/bin/sh
# Regenerates the committed Python code for proto/tadlora/v1/node.proto.
#   scripts/gen_proto.sh            writes node/tadlora/v1/node_pb2{,_grpc}.py and node_pb2.pyi
#   scripts/gen_proto.sh OUT_DIR    writes the same files under OUT_DIR (tests/test_wire.py compares them)
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3); it needs grpcio-tools.
# The code it writes refuses to import under a grpcio or protobuf older than the grpcio-tools that wrote it, so
# regenerate the committed files with grpcio-tools at pyproject.toml's grpcio floor (pip install grpcio-tools==1.85.1);
# tests/test_wire.py checks both: the code matches the proto, and its version stamps are within the floors.
set -eu
cd "$(dirname "$0")/.."
OUT="${1:-node}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" proto/tadlora/v1/node.proto
