"""The development broker: Tansu started on loopback for the demo and the tests."""
