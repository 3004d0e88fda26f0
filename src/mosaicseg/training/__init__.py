"""Training: the one Trainer loop, losses, recipes (single, universal, ...) and logging."""
