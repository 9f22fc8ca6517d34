"""Shipped profiles (installed as `kvchat_profiles`): one YAML file per profile."""
