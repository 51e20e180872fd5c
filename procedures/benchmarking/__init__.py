"""Speed and memory: bench.py's library and the GPU check."""
