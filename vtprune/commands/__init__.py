"""The command line's subcommand modules (`vtprune testbed ...`, `vtprune bench ...`, `vtprune train-rcp`) and
what they share (`common`). `vtprune.cli` assembles them; the applications they drive never import this package."""
