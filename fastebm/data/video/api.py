"""Kept only for fastebm/train/trainer.py until it uses ``VideoPrefetcher.prefetch/get``; removed then.

The decoder's modules: ``decoder`` (decode, load_video_sample), ``backend`` (choose_backend),
``stats`` (decode_stats), ``threads`` (decode threads' torch threads), ``prefetch`` (VideoPrefetcher).
"""
from .decoder import load_video_sample
from .threads import decode_thread_pool

__all__ = ["decode_thread_pool", "load_video_sample"]
