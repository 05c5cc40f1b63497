"""Load tests and capacity planning for CRS Lookup (docs/loadtests.md is the manual).

  bench/      `./crsw bench` (python -m loadtests.bench): lookups per node core vs a bare grpc.aio server
  sweep/      `python -m loadtests.sweep`: throughput and CPU per lookup vs node processes; the capacity model
  scenarios/  the locust scenarios (`locust -f loadtests/scenarios/locustfile.py`)
  shared/     what they share: keys and mixes, latency histograms, process CPU time, report helpers
  cli.py      `crs-load` (capacity, sweep, bench)

The product (server/) never imports this package.
"""
