"""Teacher adaptation and student distillation (to come)."""
