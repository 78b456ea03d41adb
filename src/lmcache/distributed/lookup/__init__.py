"""Scheduler→worker lookup over ZMQ: LookupClient (scheduler side) and LookupServer (worker side)."""
