"""Reformer's shared-QK attention, registered as ``"shared_qk"`` (implemented in chapter 04's module).

Importing this module (the attention registry does, lazily) makes ``TransformerConfig(attention="shared_qk")``
work without importing :mod:`effedu.general.sharing` first.
"""
from ..general.sharing import shared_qk_attention  # noqa: F401  (registers "shared_qk")

__all__ = ["shared_qk_attention"]
