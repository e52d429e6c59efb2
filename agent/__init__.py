"""The rig-agent runtime: CLI, supervisor, signal handling and logging."""
