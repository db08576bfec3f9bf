"""The lab's benchmarks: ``python -m benchmarks.<name>`` from a checkout's root (not installed)."""
