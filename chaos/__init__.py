"""The chaos soak (issue 12): `python -m chaos --seed N --duration 60s`. See chaos/run.py
for the topology and the faults, chaos/checker.py for the invariants it proves."""
