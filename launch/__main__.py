"""`python -m atoll.launch` is the `atoll` command."""

from atoll.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
