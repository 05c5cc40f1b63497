"""The scaling sweep (`python -m loadtests.sweep`) and the capacity model that reads its report
(`crs-load capacity`). run.py drives the service and locust (never importing locust); report.py is the
arithmetic and outputs; capacity.py the planner."""
