"""Built-in trainers, one module each, registered by name in the TRAINERS plugin group."""
