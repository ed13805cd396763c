"""Subcommands that live beside `cli.py`: each module's `add_parsers(subparsers)` adds its
commands, each with `set_defaults(run=fn)` where `fn(args) -> int` is the exit status. User
errors are raised as ValueError (one line, exit 2, printed by the caller)."""
