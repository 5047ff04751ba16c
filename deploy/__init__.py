"""CLI, configuration, wiring of the layers, and (later) the service process."""
