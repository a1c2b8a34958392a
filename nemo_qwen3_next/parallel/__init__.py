"""Parallelism beyond Megatron's own: context parallelism for GDN and gated attention (`context`)."""
