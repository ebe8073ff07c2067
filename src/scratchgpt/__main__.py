"""`python -m scratchgpt ...` is the same as the `scratchgpt` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
