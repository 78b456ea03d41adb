"""Fixtures of the controller unit tests (defined in controller_fleet.py)."""

from controller_fleet import controller, make_worker  # noqa: F401
