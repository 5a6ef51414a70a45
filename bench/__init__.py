"""Vigil benchmarks: real PostgreSQL, real server processes, real clients (`make bench`)."""
