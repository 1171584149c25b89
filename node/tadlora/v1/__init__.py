"""Generated protobuf and gRPC code for the tadlora.v1 node protocol (see proto/tadlora/v1/node.proto).

The *_pb2* modules are produced by scripts/gen_proto.sh and committed; do not edit them by hand.
"""
