"""The wire contract of stripefs: message types, service method tables, the codec,
the gRPC glue and the errno mapping. Every role imports this package; it imports no role."""

import os

# gRPC's EventEngine polling costs a thread hop per message that the older pollers do
# not: a ping-pong over one stream measured 0.28 ms with it and 0.18 ms without it
# (grpcio 1.85, this 2-core machine; docs/client.md). gRPC reads this when it starts, so
# it is set before anything imports grpc; an operator's own setting wins. Unknown names in
# a future grpcio are only logged by gRPC.
os.environ.setdefault(
    "GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
)
# A program that uses the client library and then forks (a PyTorch DataLoader's workers,
# a multiprocessing pool) needs gRPC's fork support, or gRPC's threads crash in the parent
# after the fork (measured: tests/test_fsspec.py's forked child, grpcio 1.85); the child
# opens sessions of its own (fs/fsspec.py). Read once, like the above: a program that
# imported grpc itself before stripefs sets it itself.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "1")
