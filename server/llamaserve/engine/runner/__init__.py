"""The seams of the model runner (llamaserve.engine.model_runner coordinates them), each readable and tested
alone:

- inputs    one step's inputs as flat lists (StepInputs, what every rank gets) and as staged device tensors
- sampling  seeded generators, penalty counts on the device, the one device-to-host copy per step
- adapters  which LoRA adapters are registered and which sit in the model's slots
- graphs    CUDA graphs for decode-only steps
- memory    KV cache sizing
- group     the tensor-parallel group and its step channel (steps as tensors, not pickles)
"""
