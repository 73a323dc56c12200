"""The batch-system side: how worker processes are started. ``jobs.local`` runs everything on one machine."""
