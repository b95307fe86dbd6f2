"""placeholder"""


def add_arguments(p) -> None:
    pass


def main(args) -> None:
    pass
