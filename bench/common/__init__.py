"""What the benchmarks and the tests share: engine rigs, workloads, harnesses.

The tests import these helpers from here (never the other way round: bench/ never imports
tests/). Each module needs what it runs (vLLM for the vllm_* modules, SGLang for
sglang_env), imported where it is used.
"""
