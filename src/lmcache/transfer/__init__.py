"""The transfer channel between lmcache instances (PD and P2P share it); see base.py."""

from lmcache.transfer.base import Desc, TransferChannel, TransferError

__all__ = ["Desc", "TransferChannel", "TransferError"]
