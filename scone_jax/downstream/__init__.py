"""Downstream evaluation: multiple-choice tasks scored by log-likelihood (docs/DOWNSTREAM.md)."""
