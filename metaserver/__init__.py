"""The stripefs metadata server: namespace, block maps, sessions and the data server
registry, on an embedded SQLite store (schema.sql). `MetaCore` is the whole service
without gRPC; `server.main` serves it."""
