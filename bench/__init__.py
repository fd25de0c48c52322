"""Load benchmarks for payment-grpc: `python -m bench.run --help`."""
