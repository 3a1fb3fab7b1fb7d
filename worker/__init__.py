"""GPU workers: keep the CTSR student resident, pull queued jobs in groups and batch their tiles."""
