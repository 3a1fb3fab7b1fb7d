"""Student architecture families, registered in ``models.registry`` and imported on first use."""
