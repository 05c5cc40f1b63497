"""The locust scenarios: `locust -f loadtests/scenarios/locustfile.py` (docs/loadtests.md).

locustfile.py holds the users and command-line options, grpc_user.py the gRPC user and its
interceptor, stack.py the embedded stack the locustfile starts as a child process (--crs-embedded).
Only these modules import locust or gevent.
"""
