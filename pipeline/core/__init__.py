"""The ground floor: errors, atomic artifacts, the config schema and experiment specs."""
