"""Stage 1, rollouts: the student samples responses to the step's prompts.

  samplers.py  the sampler interface the loop calls (`make_sampler`, `BuiltinSampler`)
  builtin.py   batched sampling with a KV cache from the trained model itself; reference responses for GKD
  vllm.py      rollouts from a vLLM engine that is sent the student's weights after every step
  masking.py   which token ids are left out of every objective's loss (special / chat-template tokens)
"""
