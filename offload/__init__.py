"""offload: adaptive edge offloading for image classification under a rate limit.

The torch-free core: token bucket (``bucket``), history ring (``ring``), int8
MLP and its numpy reference (``mlp``), and the policy blob (``blob``).
"""

__version__ = "0.1.0"
