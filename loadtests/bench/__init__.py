"""The benchmark (`./crsw bench`, `python -m loadtests.bench`): how fast one node core serves lookups.

run.py orchestrates; loadgen.py is the load-generator process of one phase; echo_server.py the ceiling;
report.py the arithmetic and outputs. server_model.py and reshard.py are one-off measurements
(docs/decisions.md, docs/runbooks/resharding.md).
"""
