"""Teacher adaptation, students, KD losses and one training loop: rakt adapt, distill, finetune, evaluate."""
