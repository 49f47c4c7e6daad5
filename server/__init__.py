"""Transport layer: gRPC server, interceptors, servicers, CLI, Temporal worker entry."""
