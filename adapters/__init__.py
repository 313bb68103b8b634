"""Adapters: everything that touches the outside world (files, .sxm, ZeroMQ, storage)."""
