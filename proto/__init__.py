"""The wire contract of stripefs: message types, service method tables, the codec,
the gRPC glue and the errno mapping. Every role imports this package; it imports no role."""
