"""Compare a running config with a reloaded one: what restarts, and what needs a full restart."""

from __future__ import annotations

from dataclasses import dataclass, field

from config.model import Config, ModbusSource, Wits0Source, WitsmlColumn

__all__ = ["ReloadPlan", "plan_reload"]

Source = ModbusSource | Wits0Source

_SINK_NAMES = ("mqtt", "cloud", "witsml")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The changes that a SIGHUP applies, keyed by source and sink name.

    `restart_required` lists the keys whose new value only takes effect when
    the agent restarts; the running agent keeps the old value of each.
    """

    stop_sources: tuple[str, ...] = ()
    start_sources: tuple[Source, ...] = ()
    restart_sinks: tuple[str, ...] = ()
    log_level: str | None = None
    metrics_listen: str | None = None
    clock_changed: bool = False
    """True when agent.clock_check or agent.clock_jump_threshold changed."""
    restart_required: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        """True when the new config changes nothing that a reload applies."""
        return not (
            self.stop_sources
            or self.start_sources
            or self.restart_sinks
            or self.log_level
            or self.metrics_listen is not None
            or self.clock_changed
        )

    def changes(self) -> dict[str, object]:
        """Return the applied changes as log fields, leaving out the parts that stay."""
        started = [source.name for source in self.start_sources]
        fields: dict[str, object] = {
            # A source that is stopped and started again was changed, not removed.
            "sources_restarted": [name for name in self.stop_sources if name in started],
            "sources_removed": [name for name in self.stop_sources if name not in started],
            "sources_added": [name for name in started if name not in self.stop_sources],
            "sinks_restarted": list(self.restart_sinks),
        }
        if self.log_level is not None:
            fields["log_level"] = self.log_level
        if self.metrics_listen is not None:
            fields["metrics_listen"] = self.metrics_listen
        if self.clock_changed:
            fields["clock"] = "changed"
        return {key: value for key, value in fields.items() if value != []}


def _sources(config: Config) -> dict[str, Source]:
    named: dict[str, Source] = {source.name: source for source in config.sources.modbus}
    named.update((source.name, source) for source in config.sources.wits0)
    return named


def _witsml_columns(config: Config) -> tuple[WitsmlColumn, ...] | None:
    """Return the resolved WITSML columns, or None when the curves name missing channels."""
    try:
        return tuple(config.witsml_columns())
    except ValueError:
        return None


def _sink_sections(config: Config) -> dict[str, object]:
    """Return the config each sink is built from, per enabled sink name."""
    sections: dict[str, object] = {}
    if config.mqtt is not None:
        sections["mqtt"] = (config.mqtt, config.topic_prefix())
    if config.cloud is not None:
        sections["cloud"] = config.cloud
    if config.witsml is not None:
        # The WITSML sink uploads with the cloud section's URL and key, and its columns
        # take their units from the sources.
        sections["witsml"] = (config.witsml, config.cloud, _witsml_columns(config))
    return sections


def plan_reload(old: Config, new: Config) -> tuple[ReloadPlan, Config]:
    """Return what to restart to move a running agent from `old` to `new`, and the config to run.

    A source restarts when its table changed in any key, or when it was added
    or removed. A sink restarts when its table changed, and the witsml sink
    also when [cloud] or the units of its channels changed.

    Changing the rig id, the data directory, the log format or the buffer,
    and adding or removing a whole sink, need a full restart, because the
    buffer keeps one cursor per sink and is never reopened. The returned
    config keeps the old values of those parts, and `restart_required` names
    them. A sink kept this way keeps running unchanged.
    """
    required: list[str] = []
    agent_update: dict[str, object] = {}
    for key in ("rig_id", "data_dir", "log_format"):
        if getattr(old.agent, key) != getattr(new.agent, key):
            required.append(f"agent.{key}")
            agent_update[key] = getattr(old.agent, key)
    update: dict[str, object] = {}
    if agent_update:
        update["agent"] = new.agent.model_copy(update=agent_update)
    if old.buffer != new.buffer:
        required.append("buffer")
        update["buffer"] = old.buffer
    old_sink_names, new_sink_names = set(old.enabled_sinks()), set(new.enabled_sinks())
    kept_sinks: set[str] = set()
    for name in _SINK_NAMES:
        if (name in old_sink_names) != (name in new_sink_names):
            verb = "added" if name in new_sink_names else "removed"
            required.append(f"[{name}] {verb}")
            # Keep the running set of sinks, each on its old table.
            update[name] = getattr(old, name)
            kept_sinks.add(name)
    effective = new.model_copy(update=update) if update else new

    old_sources, new_sources = _sources(old), _sources(effective)
    stop = [name for name, source in old_sources.items() if new_sources.get(name) != source]
    start = [source for name, source in new_sources.items() if old_sources.get(name) != source]
    old_sinks, new_sinks = _sink_sections(old), _sink_sections(effective)
    restart = [
        name
        for name, section in new_sinks.items()
        if name in old_sinks and name not in kept_sinks and old_sinks[name] != section
    ]
    old_clock = (old.agent.clock_check, old.agent.clock_jump_threshold)
    new_clock = (effective.agent.clock_check, effective.agent.clock_jump_threshold)
    plan = ReloadPlan(
        stop_sources=tuple(stop),
        start_sources=tuple(start),
        restart_sinks=tuple(restart),
        log_level=(
            effective.agent.log_level if effective.agent.log_level != old.agent.log_level else None
        ),
        metrics_listen=(
            effective.agent.metrics_listen
            if effective.agent.metrics_listen != old.agent.metrics_listen
            else None
        ),
        clock_changed=old_clock != new_clock,
        restart_required=tuple(required),
    )
    return plan, effective
