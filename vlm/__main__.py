"""`python -m vlm` runs the command-line interface."""

from vlm.app.cli import main

if __name__ == "__main__":
    main()
