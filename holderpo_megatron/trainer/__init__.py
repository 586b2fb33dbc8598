"""The trainer: config, the Actor (Megatron train/score steps), the loop."""
