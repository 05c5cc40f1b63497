"""What the benchmark, the sweep and the locust scenarios share (no locust, no gevent here)."""
