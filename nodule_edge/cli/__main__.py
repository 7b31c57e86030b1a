"""``python -m nodule_edge.cli`` (as torchrun runs it): the console script."""

from nodule_edge.cli import entry_point

if __name__ == "__main__":
    entry_point()
