"""Moving a machine: its state (machine_state), the migration stream (stream),
where it goes (channels), and the outgoing and incoming sides."""
