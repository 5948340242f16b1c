"""`python -m vlm` runs the command-line interface."""

from vlm.cli import main

if __name__ == "__main__":
    main()
