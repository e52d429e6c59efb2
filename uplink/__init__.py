"""Sinks: each delivers buffered readings to one destination."""
