"""Fusion rules: one module per family, ordered in `registry`."""

from repconv.rules.base import Fused, Rule
from repconv.rules.registry import block_rules, describe, register_rule, unregister_rule

__all__ = ["Fused", "Rule", "block_rules", "describe", "register_rule", "unregister_rule"]
