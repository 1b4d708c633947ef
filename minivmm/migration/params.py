"""Migration parameters and capabilities, as QEMU's migrate-set-parameters and
migrate-set-capabilities take them."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
CAPABILITIES = ("events", "x-ignore-shared", "return-path")


class ParameterError(ValueError):
    pass


@dataclass
class Parameters:
    downtime_limit: int = 300  # ms the VM may stay stopped at the end of precopy
    max_bandwidth: int = 128 << 20  # bytes/s while the VM runs (QEMU's default)
    mode: str = "normal"
    cpr_exec_command: list[str] = field(default_factory=list)

    def to_qmp(self) -> dict:
        out = {"downtime-limit": self.downtime_limit, "max-bandwidth": self.max_bandwidth, "mode": self.mode}
        if self.cpr_exec_command:
            out["cpr-exec-command"] = list(self.cpr_exec_command)
        return out

    def update(self, args: dict) -> None:
        """Check every argument first, then apply them all (nothing changes on an error)."""
        new = {}
        for key, value in args.items():
            if key in ("downtime-limit", "max-bandwidth"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ParameterError(f"Invalid parameter type for '{key}', expected: integer")
                limit = 2_000_000 if key == "downtime-limit" else 1 << 62
                if not 0 <= value <= limit:
                    raise ParameterError(
                        f"Parameter '{key.replace('-', '_')}' expects an integer in the range of 0 to {limit}"
                        + (" milliseconds" if key == "downtime-limit" else " bytes/second")
                    )
            elif key == "mode":
                if value not in MODES:
                    raise ParameterError(f"Parameter 'mode' does not accept value '{value}'")
            elif key == "cpr-exec-command":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ParameterError("Invalid parameter type for 'cpr-exec-command', expected: array of strings")
            else:
                raise ParameterError(f"Parameter '{key}' is unexpected")
            new[key.replace("-", "_")] = value
        for key, value in new.items():
            setattr(self, key, value)


def parse_capabilities(items: object) -> dict[str, bool]:
    if not isinstance(items, list):
        raise ParameterError("Invalid parameter type for 'capabilities', expected: array")
    out = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"capability", "state"}:
            raise ParameterError(f'Parameter \'capabilities[{i}]\' expects {{"capability": NAME, "state": BOOL}}')
        name, state = item["capability"], item["state"]
        if name not in CAPABILITIES:
            raise ParameterError(f"Parameter 'capability' does not accept value '{name}'")
        if not isinstance(state, bool):
            raise ParameterError("Invalid parameter type for 'state', expected: boolean")
        out[name] = state
    return out
