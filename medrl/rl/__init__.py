"""GRPO's maths as pure functions: the trajectory container, rewards (accuracy, format, the CARE consistency
bonus), group advantages, the clipped policy loss with its aggregations and KL, and the EMA reference model.

The LightningModule in ``medrl.lit.grpo`` only orchestrates these.
"""
