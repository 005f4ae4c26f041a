"""Metrics: answer parsing, Pass@K, and MedMNIST ACC/AUC exactly as its Evaluator."""
