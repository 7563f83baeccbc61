"""Integrations of scrimp's methods with other engines (vLLM). They import the methods; no method imports them."""
