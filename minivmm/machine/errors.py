"""The one error a machine that cannot be built raises."""

from __future__ import annotations


class MachineError(Exception):
    """A machine cannot be built; ``option`` names the culprit on the command line."""

    def __init__(self, option: str, text: str) -> None:
        super().__init__(f"{option}: {text}" if option else text)
        self.option = option
