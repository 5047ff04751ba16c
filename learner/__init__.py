"""Models, the online update loop and the strategies against forgetting."""
