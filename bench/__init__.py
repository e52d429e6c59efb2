"""Benchmarks of rig-agent, which the test command does not run (see bench/README.md)."""
