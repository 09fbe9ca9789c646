# llmuxd on top of vLLM's own image.  Build (legacy builder or BuildKit):
#
#   docker build -t llmuxd .
#   docker build -t llmuxd --build-arg BASE_IMAGE=vllm/vllm-openai:v0.32.0 \
#     --build-arg PIP_INDEX_URL=https://pypi.example/simple --build-arg BUILD_EXTRA=build-extra .
#
# BASE_IMAGE: vLLM 0.17 or newer; before that, sleep mode never put the weights into its
# allocator's pool, so offload and discard freed no GPU memory (vLLM #32947).
# Restricted networks: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, and a folder of the
# build context (BUILD_EXTRA) with a CA bundle `ca.crt` and/or a wheelhouse `wheels/`; all of it
# is used by the build stages only (packaging/docker/build-extra/README.md).
# CUDA_CHECKPOINT_URL / CUDA_CHECKPOINT_SHA256: NVIDIA's cuda-checkpoint, pinned; an empty URL
# leaves it out (no CUDA suspend or GPU checkpoints then).
# Run lines for both shapes (systemd as PID 1; --pid=host with llmuxd as the entrypoint): README.md,
# "The container image".
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0

# ---- NVIDIA's cuda-checkpoint (CUDA suspend/resume from outside the process), checksum pinned
FROM ${BASE_IMAGE} AS cuda-checkpoint
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG BUILD_EXTRA=packaging/docker/build-extra
ARG CUDA_CHECKPOINT_URL=https://github.com/NVIDIA/cuda-checkpoint/raw/6ec728aff032c18c9fb0794a272d94c6adcce508/bin/x86_64_Linux/cuda-checkpoint
ARG CUDA_CHECKPOINT_SHA256=707fa7f54136824d6c1d6dd724b9b1717610f831033c00d06da474de363a06db
COPY ${BUILD_EXTRA} /tmp/build-extra/
COPY packaging/docker/build.sh /build/
RUN bash /build/build.sh cuda-checkpoint

# ---- build stage: compiler, package index, CRIU download; nothing of it but the results goes on
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG BUILD_EXTRA=packaging/docker/build-extra
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
COPY ${BUILD_EXTRA} /tmp/build-extra/
COPY packaging/install.sh packaging/install-criu.sh packaging/apt-missing.sh /build/src/packaging/
COPY packaging/docker/build.sh /build/src/packaging/docker/
# The compiler and headers; CRIU >= 4.2 from Debian's packages in its own root (/opt/llmuxd/criu,
# wrapper /usr/local/bin/criu).
RUN bash /build/src/packaging/docker/build.sh tools \
    && bash /build/src/packaging/install.sh --stages criu
COPY pyproject.toml README.md /build/src/
RUN bash /build/src/packaging/docker/build.sh deps /build/src
COPY llmuxd /build/src/llmuxd
RUN bash /build/src/packaging/docker/build.sh package /build/src

# ---- the image
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV container=docker
COPY --from=build /opt/llmuxd/ /opt/llmuxd/
COPY --from=build /usr/local/bin/criu /usr/local/bin/criu
COPY --from=cuda-checkpoint /out/ /usr/local/bin/
COPY packaging /tmp/llmuxd-src/packaging
COPY systemd /tmp/llmuxd-src/systemd
COPY dbus /tmp/llmuxd-src/dbus
# Run-time packages (systemd, D-Bus, ... where the base lacks them), the units, the D-Bus policy,
# /usr/local/bin/llmuxd and llmuxd-vllm-sim (the same install script the tests' containers run);
# then the container's own: the journal (the models' output in it) on `docker logs`, and the
# container's environment for the llmuxd units; units that would act on the host are masked.
RUN bash /tmp/llmuxd-src/packaging/install.sh --stages system,files,enable --venv /opt/llmuxd/venv \
    && d=/tmp/llmuxd-src/packaging/docker \
    && install -m 0644 "$d/llmuxd-console.service" /etc/systemd/system/ \
    && install -d /etc/systemd/system/sysinit.target.wants \
       /etc/systemd/system/llmuxd.service.d /etc/systemd/system/llmuxd-restore.service.d \
    && ln -sf /etc/systemd/system/llmuxd-console.service /etc/systemd/system/sysinit.target.wants/ \
    && install -m 0644 "$d/container-env.conf" /etc/systemd/system/llmuxd.service.d/ \
    && install -m 0644 "$d/container-env.conf" /etc/systemd/system/llmuxd-restore.service.d/ \
    && install -m 0755 "$d/healthcheck.sh" /usr/local/bin/llmuxd-healthcheck \
    && grep -v '^#' "$d/masked-units" | while read -r unit; do ln -sf /dev/null "/etc/systemd/system/$unit"; done \
    && install -m 0755 /tmp/llmuxd-src/packaging/entrypoint.sh /usr/local/bin/llmuxd-entrypoint \
    && rm -rf /tmp/llmuxd-src /var/lib/apt/lists/* \
    && /usr/local/bin/criu --version >/dev/null \
    && /opt/llmuxd/venv/bin/python3 -c 'import llmuxd, pycriu.images'

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["/usr/local/bin/llmuxd-healthcheck"]
VOLUME ["/tmp/llmux-checkpoints"]
EXPOSE 3000
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/llmuxd-entrypoint"]
