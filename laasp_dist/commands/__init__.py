"""Subcommands of the `laasp-dist` CLI, one module each."""
