"""The service runtime: configuration, the Kafka service, replay sessions, metrics and HTTP."""
