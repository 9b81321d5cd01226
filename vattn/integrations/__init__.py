"""Integrations with serving frameworks: `vattn.integrations.transformers` (HF)."""
