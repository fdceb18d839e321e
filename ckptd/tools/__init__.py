"""What the operator CLI does: inspect, verify, export, diff, plot, convert (one module each)."""
