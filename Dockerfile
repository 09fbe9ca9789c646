# llmuxd on top of vLLM's own image.
#
# Default: systemd boots as PID 1 and runs llmuxd.service (the restore unit first):
#   docker run -d --name llmux --gpus all --privileged --cgroupns=private \
#     --tmpfs /run --tmpfs /run/lock --network=host \
#     -v ./config.json:/etc/llmux/config.json:ro -v /tmp/llmux-checkpoints:/tmp/llmux-checkpoints \
#     -v ~/.cache/huggingface:/root/.cache/huggingface IMAGE
# Entrypoint mode (no systemd; chosen automatically when the container has no PID namespace):
#   docker run -d --name llmux --gpus all --privileged --pid=host --ipc=host --network=host \
#     -v ./config.json:/etc/llmux/config.json:ro -v /tmp/llmux-checkpoints:/tmp/llmux-checkpoints \
#     -v ~/.cache/huggingface:/root/.cache/huggingface IMAGE
FROM vllm/vllm-openai:v0.15.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV container=docker \
    DEBIAN_FRONTEND=noninteractive

COPY pyproject.toml README.md /opt/llmuxd/src/
COPY llmuxd /opt/llmuxd/src/llmuxd
COPY packaging /opt/llmuxd/src/packaging
COPY systemd /opt/llmuxd/src/systemd
COPY dbus /opt/llmuxd/src/dbus

# The same install the tests' container image runs (packaging/install.sh): run-time packages,
# CRIU >= 4.2 in its own root, llmuxd in /opt/llmuxd/venv, units, D-Bus policy.
RUN bash /opt/llmuxd/src/packaging/install.sh --stages system,criu,python,files,enable \
    && rm -rf /var/lib/apt/lists/*

# NVIDIA's cuda-checkpoint utility (CUDA suspend/resume from outside the process).
ADD --chmod=755 https://github.com/NVIDIA/cuda-checkpoint/raw/main/bin/x86_64_Linux/cuda-checkpoint /usr/local/bin/cuda-checkpoint

COPY packaging/entrypoint.sh /usr/local/bin/llmuxd-entrypoint
VOLUME ["/tmp/llmux-checkpoints"]
EXPOSE 3000
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/llmuxd-entrypoint"]
