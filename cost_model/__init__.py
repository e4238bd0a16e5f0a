"""autoshard.cost_model."""
