"""Reference ingest service for the agent's HTTPS uplink, for tests, demos and the cloud team.

Run it with `rig-agent-cloud serve` or `uvicorn cloud.app:app` (settings from
the `RIG_CLOUD_*` environment variables, see `cloud.settings`).
"""
