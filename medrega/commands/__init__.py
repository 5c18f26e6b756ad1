"""CLI command groups beyond the six stages; each module registers its commands on `medrega.cli.app`."""
