"""The generated gRPC code of `protos/vigil/v1` (`make proto`; never edited by hand)."""
