"""The command line: argument parsing, terminal output and logging set-up. Nothing imports it."""
