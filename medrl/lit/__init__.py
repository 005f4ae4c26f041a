"""The study's LightningModules, one per file: probe, SFT, GRPO."""
