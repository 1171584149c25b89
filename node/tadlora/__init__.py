"""tadlora: serverless, decentralized federated LoRA fine-tuning (TAD-LoRA).

The package holds one algorithm core (`tadlora.core`: methods, mixing, topologies, diagnostics), adapter
handling (`tadlora.adapter`), data (`tadlora.data`), local training (`tadlora.training`), and the two drivers
that use them: the in-process simulator (`tadlora.sim`) and the node daemon (`tadlora.node`).
"""

__version__ = "0.1.0"
