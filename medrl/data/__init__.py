"""Data: MedMNIST (image and VQA modes), VQA construction, PMC-VQA and the benchmark suite."""
