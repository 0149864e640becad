"""`pdctl`: the command-line front end. Each command group lives in its own module."""
