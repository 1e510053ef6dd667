"""Evaluation: generation, reward metrics, an LLM judge (absolute and pairwise), VideoQA, a report."""
