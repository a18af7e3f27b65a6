import numpy as np

from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page


def make_ns(**over) -> Namespace:
    base = dict(model="tiny-llama", kv_dtype="bfloat16", layout="mha", page_size=16, num_heads=2, head_dim=64,
                num_layers=2)
    base.update(over)
    return Namespace(**base)


def small_page(seed: int, ns: Namespace | None = None) -> np.ndarray:
    ns = ns or make_ns()
    return kv_page(np.random.default_rng(seed), page_size=ns.page_size, num_heads=ns.num_heads,
                   head_dim=ns.head_dim, dtype=ns.kv_dtype)


