"""The stripefs data server: immutable checksummed blocks on local disk (store.py), their
RPC service (service.py), and the process that registers and heartbeats with the
metaserver (server.py)."""
