"""The CPU side: HTTP API, planning, merging, reconciling."""
