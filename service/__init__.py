"""The HTTP gateway: validates uploads, queues jobs in Redis/RQ, serves status and results.

Imports no torch (the gateway container is slim); ``tests/test_service.py`` proves it.
"""
