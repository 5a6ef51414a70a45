"""Shared foundation of Vigil's services: configuration, timings, clock, database
pool and migrations, named SQL, error mapping, gRPC server plumbing and metrics."""
